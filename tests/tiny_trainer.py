"""A real, tiny trainer with the retrieval trainer's run/resume/signal contract, for fast launcher tests.

``run(cfg, run_dir, resume)`` trains a linear model with Accelerate (gloo on CPU) for
``cfg.schedule.epochs * cfg.schedule.iters_per_epoch`` steps, logs ``train/loss`` per step to TensorBoard,
saves resumable state every ``cfg.checkpoint.every_steps`` steps and, after SIGUSR2/SIGTERM, at the next
step boundary (all ranks agree), then raises SystemExit.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)
STEP_SLEEP_S = 0.05


def _latest(ckpt_dir: Path) -> Path | None:
    states = sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return states[-1] if states else None


def run(cfg, run_dir: str | None = None, resume: str | None = None) -> dict:
    stop = {"signal": 0}

    def on_signal(signum, frame):
        stop["signal"] = signum

    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, on_signal)
    accelerator = Accelerator()
    torch.manual_seed(cfg.train.seed)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    run_path = Path(run_dir)
    ckpt_dir = run_path / "checkpoints"
    start = 0
    latest = _latest(ckpt_dir) if resume == "auto" else (Path(resume) if resume else None)
    if latest is not None:
        state = torch.load(latest, map_location="cpu")
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log.info("resumed from step %d (%s)", start, latest)
    total = cfg.schedule.epochs * cfg.schedule.iters_per_epoch
    writer = SummaryWriter(str(run_path / "tb")) if accelerator.is_main_process else None
    gen = torch.Generator().manual_seed(accelerator.process_index)
    loss = torch.zeros(())
    for step in range(start + 1, total + 1):
        x = torch.randn(16, 8, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        time.sleep(STEP_SLEEP_S)
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)
        flag = accelerator.reduce(torch.tensor(float(stop["signal"])), reduction="sum").item()
        if step % cfg.checkpoint.every_steps == 0 or flag:
            _save(accelerator, model, optimizer, step, ckpt_dir)
        if flag:
            log.info("signal received: state saved at step %d; exiting", step)
            if writer is not None:
                writer.close()
            accelerator.wait_for_everyone()
            raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    return {"final_loss": loss.item(), "steps": total, "world_size": accelerator.num_processes}


def _save(accelerator, model, optimizer, step: int, ckpt_dir: Path) -> None:
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict()}
        tmp = ckpt_dir / f"step_{step}.pt.tmp"
        torch.save({**state, "step": step}, tmp)
        tmp.replace(ckpt_dir / f"step_{step}.pt")
    accelerator.wait_for_everyone()
