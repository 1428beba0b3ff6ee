"""Export a retrieval model to ONNX with a dynamic batch size:
``python -m inference.export --config NAME --checkpoint CKPT --out model.onnx [--check]``.

Works for the timm ResNets, our ResNet-IBN-a (InstanceNorm exports as ``InstanceNormalization``) and timm
Swin. The file carries the model spec and the checkpoint's sha256 (ONNX metadata), so the recogniser can
check it against a config and a gallery bank built from the same checkpoint accepts it.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.extract import embed
from inference.retriever import META_PREFIX, crop_spec, load_retriever, model_spec

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "images", "embeddings"


class _Embedder(nn.Module):
    """The inference path only: images -> embedding (what ``inference.extract.embed`` returns)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return embed(self.model, images)


def export_onnx(model: nn.Module, height: int, width: int, metadata: dict[str, str] | None = None) -> bytes:
    """ONNX bytes of ``model`` (eval mode) for inputs [batch, 3, height, width], batch dynamic."""
    import onnx

    wrapper = _Embedder(model).eval()
    example = torch.randn(2, 3, height, width)
    buf = io.BytesIO()
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings about Python control flow
        # dynamo=False: the TorchScript exporter needs no onnxscript and handles timm Swin's shapes
        torch.onnx.export(wrapper, (example,), buf, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)  # fmt: skip
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def max_abs_diff(model: nn.Module, onnx_bytes: bytes, images: torch.Tensor) -> float:
    """Largest absolute difference between the PyTorch and onnxruntime embeddings of ``images``."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = embed(model.eval(), images).float().numpy()
    out = session.run(None, {INPUT: images.numpy().astype(np.float32)})[0]
    if out.shape != ref.shape:
        raise ValueError(f"ONNX output shape {out.shape} differs from PyTorch's {ref.shape}")
    return float(np.abs(out - ref).max())


def write_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def export_checkpoint(checkpoint: str, out: str | Path, config: str | None = None, overrides=(), check: int = 4):
    """Export ``checkpoint`` (config from ``config`` or its run's config.json); with ``check`` > 0 compare
    ``check`` random images through onnxruntime and return the max abs difference (else None)."""
    retriever = load_retriever(checkpoint, config, overrides)
    cfg, fp = retriever.cfg, retriever.fingerprint
    meta = {
        META_PREFIX + "spec": json.dumps(model_spec(cfg), sort_keys=True),
        META_PREFIX + "weights_sha256": fp.weights_sha256,
        META_PREFIX + "dim": str(fp.dim),
        META_PREFIX + "checkpoint": str(Path(checkpoint).name),
        META_PREFIX + "crop": json.dumps(crop_spec(cfg), sort_keys=True),
    }
    data = export_onnx(retriever.model, cfg.data.height, cfg.data.width, meta)
    write_atomic(data, Path(out))
    log.info("wrote %s (%.1f MB, embedding dim %d, dynamic batch)", out, len(data) / 2**20, fp.dim)
    if not check:
        return None
    images = torch.randn(check, 3, cfg.data.height, cfg.data.width, generator=torch.Generator().manual_seed(0))
    diff = max_abs_diff(retriever.model, data, images)
    log.info("onnxruntime vs PyTorch on %d random images: max abs diff %.2e", check, diff)
    return diff


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="retrieval weights (mAPxx.x.pth)")
    parser.add_argument("--config", default=None, help="config name (default: config.json beside the checkpoint)")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--check", type=int, default=4, help="compare N random images through onnxruntime (0 = no)")
    args, overrides = parser.parse_known_args(argv)
    if overrides and not args.config:  # they would change nothing: the run's config.json is read as it is
        parser.error(f"{' '.join(overrides)}: key=value overrides need --config NAME")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        diff = export_checkpoint(args.checkpoint, args.out, args.config, overrides, args.check)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if diff is not None:
        print(f"wrote {args.out}; onnxruntime max abs diff {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
