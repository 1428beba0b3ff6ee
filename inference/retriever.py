"""A retrieval model ready to embed crops: a PyTorch checkpoint (``mAPxx.x.pth`` + its run's ``config.json``)
or an exported ``.onnx`` file, with the fingerprint that a gallery bank records to refuse other models.

The fingerprint is (sha256 of the checkpoint file, sha256 of the model-relevant config, embedding size).
An ONNX file made by ``inference.export`` carries the fingerprint of the checkpoint it came from, so a bank
built with the ``.pth`` serves the ``.onnx`` and the reverse.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from configs import AugmentConfig, DataConfig, ExperimentConfig, from_dict, load_config
from datasets.transforms import eval_transform
from inference.extract import embed

log = logging.getLogger(__name__)

# ModelConfig fields that do not change the embedding of a loaded checkpoint (training-time choices).
_TRAINING_ONLY = ("pretrained", "pretrained_path", "drop_path")
META_PREFIX = "detretr."


@dataclass(frozen=True)
class Fingerprint:
    """What made an embedding: the weights file, the model-relevant config and the embedding size."""

    weights_sha256: str
    config_sha256: str
    dim: int

    def describe(self) -> str:
        return f"weights {self.weights_sha256[:12]}, config {self.config_sha256[:12]}, dim {self.dim}"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_spec(cfg: ExperimentConfig) -> dict:
    """The config that decides what a checkpoint computes: model section and input size / normalisation."""
    model = {f.name: getattr(cfg.model, f.name) for f in fields(cfg.model) if f.name not in _TRAINING_ONLY}
    a = cfg.data.augment
    return {
        "model": json.loads(json.dumps(model)),
        "input": {"height": cfg.data.height, "width": cfg.data.width, "mean": list(a.mean), "std": list(a.std)},
    }


def crop_spec(cfg: ExperimentConfig) -> dict:
    """How the run cut its training crops (``data.prepare``): an exported file carries it, so that a gallery
    built from the file alone crops the library as training did."""
    p = cfg.data.prepare
    return {"padding": p.padding, "min_size": p.min_size, "max_side": p.max_side, "quality": p.quality}


def spec_sha256(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def spec_config(spec: dict) -> ExperimentConfig:
    """An ExperimentConfig carrying a model spec (model section, input size and normalisation)."""
    inp = spec["input"]
    cfg = ExperimentConfig(
        data=DataConfig(
            height=int(inp["height"]),
            width=int(inp["width"]),
            augment=AugmentConfig(mean=tuple(inp["mean"]), std=tuple(inp["std"])),
        )
    )
    cfg.model = from_dict(spec["model"], type(cfg.model))
    return cfg


def read_run_config(checkpoint: Path) -> ExperimentConfig:
    """The ``config.json`` that the retrieval trainer wrote beside its best weights."""
    path = checkpoint.parent / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config for {checkpoint}: {path} does not exist; pass --config NAME (the experiment that trained it)"
        )
    try:
        data = json.loads(path.read_text())
        data.pop("resolved", None)  # values the trainer derived at run time (scaled lr, ...), not config keys
        return from_dict(data)
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable experiment config ({exc}); pass --config NAME instead") from None


class Retriever:
    """Embeds a list of RGB crops into [N, D] float32 features, batch by batch, the way evaluation does."""

    fingerprint: Fingerprint
    cfg: ExperimentConfig
    source: str

    def __init__(self, cfg: ExperimentConfig, batch_size: int = 64) -> None:
        self.cfg, self.batch_size = cfg, batch_size
        self.transform = eval_transform(cfg)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, crops: list[Image.Image]) -> torch.Tensor:
        if not crops:
            return torch.zeros(0, self.fingerprint.dim)
        out = []
        for s in range(0, len(crops), self.batch_size):
            batch = torch.stack([self.transform(img) for img in crops[s : s + self.batch_size]])
            out.append(self._forward(batch).float().cpu())
        return torch.cat(out)


class TorchRetriever(Retriever):
    """A retrieval model (nn.Module in eval mode) with its config; runs on ``device``."""

    def __init__(self, model: torch.nn.Module, cfg: ExperimentConfig, fingerprint: Fingerprint, device="cpu", **kw):
        super().__init__(cfg, **kw)
        self.model, self.device, self.fingerprint = model.to(device).eval(), torch.device(device), fingerprint
        self.source = "torch"

    @torch.no_grad()
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return embed(self.model, batch.to(self.device))


class OnnxRetriever(Retriever):
    """An ONNX retrieval model run by onnxruntime (CPU, or CUDA when its provider is installed)."""

    def __init__(self, session, cfg: ExperimentConfig, fingerprint: Fingerprint, **kw) -> None:
        super().__init__(cfg, **kw)
        self.session, self.fingerprint, self.source = session, fingerprint, "onnx"
        self.input_name = session.get_inputs()[0].name

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: batch.numpy().astype(np.float32)})[0])


def embedding_dim(cfg: ExperimentConfig) -> int:
    """The embedding size that cfg.model produces (built on the meta device: no memory, no weights)."""
    from inference.models import build_model

    with torch.device("meta"):
        return int(build_model(cfg.model, 1, img_size=(cfg.data.height, cfg.data.width)).dim)


def load_torch_retriever(checkpoint: str | Path, cfg: ExperimentConfig | None = None, device="cpu", **kw):
    """A checkpoint with its config (``cfg`` or the run's ``config.json``)."""
    from inference.models import load_model

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"retriever checkpoint {path} does not exist")
    cfg = cfg or read_run_config(path)
    model = load_model(cfg.model, path, img_size=(cfg.data.height, cfg.data.width))
    dim = int(model.dim)
    fp = Fingerprint(file_sha256(path), spec_sha256(model_spec(cfg)), dim)
    return TorchRetriever(model, cfg, fp, device, **kw)


def onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def load_onnx_retriever(path: str | Path, cfg: ExperimentConfig | None = None, device="cpu", **kw):
    """An exported model; its embedded spec must match ``cfg`` when given (else ValueError naming both)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX retriever {path} does not exist")
    meta = onnx_metadata(path)
    spec = json.loads(meta[META_PREFIX + "spec"]) if META_PREFIX + "spec" in meta else None
    if spec is None and cfg is None:
        raise ValueError(f"{path} carries no model spec (not exported by inference.export): pass --config NAME")
    if spec is not None and cfg is not None and spec != model_spec(cfg):
        diff = _spec_diff(spec, model_spec(cfg))
        raise ValueError(f"{path} does not match the config: {diff}")
    if cfg is None:
        cfg = spec_config(spec)
        if META_PREFIX + "crop" in meta:
            for key, value in json.loads(meta[META_PREFIX + "crop"]).items():
                setattr(cfg.data.prepare, key, value)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if str(device).startswith("cuda") else None
    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    _check_onnx_shapes(path, session, cfg)
    dim = int(session.get_outputs()[0].shape[1])
    weights = meta.get(META_PREFIX + "weights_sha256") or file_sha256(path)
    fp = Fingerprint(weights, spec_sha256(model_spec(cfg)), dim)
    return OnnxRetriever(session, cfg, fp, **kw)


def _spec_diff(a: dict, b: dict, prefix: str = "") -> str:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            sub = _spec_diff(x, y, f"{prefix}{key}.")
            out += [sub] if sub else []
        elif x != y:
            out.append(f"{prefix}{key}: file {x!r} vs config {y!r}")
    return "; ".join(out)


def _check_onnx_shapes(path: Path, session, cfg: ExperimentConfig) -> None:
    """Input [B, 3, H, W] with the config's H, W (when static) and an output [B, D] with the model's D."""
    shape = session.get_inputs()[0].shape
    want = [3, cfg.data.height, cfg.data.width]
    fixed = [(got, exp) for got, exp in zip(shape[1:], want) if isinstance(got, int)]
    if len(shape) != 4 or any(got != exp for got, exp in fixed):
        raise ValueError(f"{path}: input shape {shape} does not match the config's [batch, 3, {want[1]}, {want[2]}]")
    out = session.get_outputs()[0].shape
    expected = embedding_dim(cfg)
    if len(out) != 2 or out[1] != expected:
        raise ValueError(f"{path}: output shape {out} does not match the config's embedding size {expected}")


def load_retriever(path: str | Path, config: str | None = None, overrides=(), device="cpu", batch_size: int = 64):
    """``.onnx`` -> OnnxRetriever, anything else -> a PyTorch checkpoint; ``config`` names configs/NAME.py."""
    cfg = load_config(config, list(overrides)) if config else None
    kw = {"batch_size": batch_size}
    if Path(path).suffix == ".onnx":
        return load_onnx_retriever(path, cfg, device, **kw)
    return load_torch_retriever(path, cfg, device, **kw)
