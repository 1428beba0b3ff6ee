"""Two gloo ranks gather their extracted features: each sample once, ordered by index."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inference.evaluate import gather_parts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        index = torch.arange(rank, 7, world_size)  # rank 0: 0,2,4,6; rank 1: 1,3,5
        parts = {"features": index[:, None].float().repeat(1, 3), "identity": index * 10, "index": index}
        torch.save(gather_parts(parts, world_size), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_over_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["index"].tolist() == list(range(7))
        assert got["identity"].tolist() == [10 * i for i in range(7)]
        assert torch.equal(got["features"][:, 0], torch.arange(7.0))
