"""Teacher outputs computed once over the training stream's augmented batches and stored beside the shards.

The training batches are a pure function of the data recipe (manifest, seed, epoch, batch plan, augmentation),
so the teacher's pooled features and logits for every (epoch, step, position in the global batch) can be
computed once and read back by every later student run with that recipe: ``python -m distill.cache --config
NAME`` or ``distill.cache=use`` (built on first use). Layout of ``<data.shards>/teacher_cache/<recipe>/``:
``meta.json`` (teacher checkpoint sha256, recipe, shapes) and per epoch ``eNNNN-{feat,logits,keys}.npy``
arrays of shape [steps, global batch, ...], read through memory maps. The folder is written under a temporary
name and renamed into place. A cache made by another teacher checkpoint, or for other batches, is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from configs import AugmentConfig, ExperimentConfig, load_config, to_dict
from datasets.shards import MANIFEST
from datasets.transforms import model_images
from distill.teacher import Teacher, load_teacher

log = logging.getLogger(__name__)

FORMAT = 1
# the settings that decide which images (and augmentations) make up each training batch
RECIPE_KEYS = ("train_split", "height", "width", "sampler", "batch_size", "num_instances", "balanced_cap", "augment")


def recipe(cfg: ExperimentConfig) -> dict:
    """Everything the cached batches depend on besides the teacher."""
    manifest = Path(cfg.data.shards) / MANIFEST
    data = to_dict(cfg.data)
    out = {
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "data": {k: data[k] for k in RECIPE_KEYS},
        "seed": cfg.train.seed,
        "epochs": cfg.schedule.epochs,
        "iters_per_epoch": cfg.schedule.iters_per_epoch,
    }
    return json.loads(json.dumps(out))  # as meta.json holds it (tuples become lists)


def cache_dir(cfg: ExperimentConfig) -> Path:
    """``distill.cache_dir`` or ``<data.shards>/teacher_cache/<recipe fingerprint>``."""
    if cfg.distill.cache_dir:
        return Path(cfg.distill.cache_dir)
    digest = hashlib.sha256(json.dumps(recipe(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.data.shards) / "teacher_cache" / digest


def global_batches(
    epoch_batches, steps: int, augment: AugmentConfig, device: torch.device | str = "cpu"
) -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """(step, keys, images) of each global batch of one epoch read as a single rank: the micro-batches of one
    step joined in order, their images normalised on ``device`` as the training loop does."""
    keys: list[str] = []
    images: list[torch.Tensor] = []
    current = 0
    for batch in epoch_batches:
        step = int(batch["step"])
        if step != current and images:
            yield current, keys, torch.cat(images)
            keys, images = [], []
        if step >= steps:
            return
        current = step
        keys += [str(k) for k in batch["key"]]
        images.append(model_images(batch, augment, device))
    if images:
        yield current, keys, torch.cat(images)


def num_steps(stream, epoch: int, cfg: ExperimentConfig) -> int:
    """Global batches (optimizer steps) of an epoch, capped by ``schedule.iters_per_epoch``."""
    steps = stream.num_steps(epoch)
    return min(steps, cfg.schedule.iters_per_epoch) if cfg.schedule.iters_per_epoch else steps


class TeacherCache:
    """Read side of a built cache: ``lookup(epoch, step, offset, keys)`` -> the teacher's rows for a micro-batch."""

    def __init__(self, folder: str | Path, teacher: Teacher, cfg: ExperimentConfig) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"teacher cache {self.folder}: no meta.json (build it: python -m distill.cache)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("teacher_sha256") != teacher.fingerprint:
            raise ValueError(
                f"teacher cache {self.folder} was made by teacher checkpoint {self.meta.get('teacher_checkpoint')} "
                f"(sha256 {str(self.meta.get('teacher_sha256'))[:12]}...), not by distill.teacher_checkpoint="
                f"{str(teacher.checkpoint)!r} (sha256 {teacher.fingerprint[:12]}...): refusing it; rebuild it with "
                "distill.cache=build or point distill.cache_dir elsewhere"
            )
        want = recipe(cfg)
        if self.meta.get("recipe") != want:
            diff = [k for k in want if self.meta.get("recipe", {}).get(k) != want[k]]
            raise ValueError(
                f"teacher cache {self.folder} was made for other training batches (differs in {diff}): refusing "
                "it; rebuild it with distill.cache=build"
            )
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def _array(self, epoch: int, name: str) -> np.ndarray:
        if (epoch, name) not in self._arrays:
            path = self.folder / f"e{epoch:04d}-{name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"teacher cache {self.folder}: {path.name} is missing (rebuild it)")
            self._arrays[(epoch, name)] = np.load(path, mmap_mode="r")
        return self._arrays[(epoch, name)]

    def lookup(self, epoch: int, step: int, offset: int, keys: Sequence[str], device) -> dict[str, torch.Tensor]:
        stored = self._array(epoch, "keys")
        if step >= stored.shape[0] or offset + len(keys) > stored.shape[1]:
            raise ValueError(
                f"teacher cache {self.folder}: epoch {epoch} step {step} rows {offset}..{offset + len(keys)} are "
                f"outside its {stored.shape[0]} steps x {stored.shape[1]} samples; rebuild it with distill.cache=build"
            )
        row = [str(k) for k in stored[step, offset : offset + len(keys)]]
        if row != list(keys):
            raise ValueError(
                f"teacher cache {self.folder}: epoch {epoch} step {step} holds samples {row[:4]}... where the "
                f"batch has {list(keys)[:4]}...: it was made for another batch plan; rebuild it with "
                "distill.cache=build"
            )
        out = {}
        for name in ("feat", "logits"):
            rows = np.array(self._array(epoch, name)[step, offset : offset + len(keys)], dtype=np.float32)
            out[name] = torch.from_numpy(rows).to(device, non_blocking=True)
        return out


def build_cache(cfg: ExperimentConfig, teacher: Teacher, folder: Path, device) -> Path:
    """Run the teacher over every training batch of every epoch (as one rank) and write the cache atomically."""
    from datasets.stream import TrainStream

    dtype = np.dtype(cfg.distill.cache_dtype)
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stream = TrainStream(cfg, 0, 1)
    per_epoch = []
    try:
        for epoch in range(cfg.schedule.epochs):
            per_epoch.append(_build_epoch(cfg, teacher, stream, epoch, tmp, dtype, device))
    finally:
        stream.close()
    meta = {
        "format": FORMAT,
        "teacher_checkpoint": str(teacher.checkpoint),
        "teacher_sha256": teacher.fingerprint,
        "teacher_config": teacher.cfg.name,
        "recipe": recipe(cfg),
        "dtype": cfg.distill.cache_dtype,
        "feat_dim": teacher.dim,
        "num_classes": teacher.num_classes,
        "steps": per_epoch,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    log.info("teacher cache written to %s (%d epochs, %d steps)", folder, len(per_epoch), sum(per_epoch))
    return folder


def _build_epoch(cfg, teacher: Teacher, stream, epoch: int, tmp: Path, dtype, device) -> int:
    steps = num_steps(stream, epoch, cfg)
    feat = logits = keys = None
    for step, names, images in global_batches(stream.epoch(epoch), steps, cfg.data.augment, device):
        if feat is None:  # the global batch size as the stream makes it (every step has the same)
            shape = (steps, len(names))
            feat = np.lib.format.open_memmap(tmp / f"e{epoch:04d}-feat.npy", "w+", dtype, (*shape, teacher.dim))
            logits = np.lib.format.open_memmap(
                tmp / f"e{epoch:04d}-logits.npy", "w+", dtype, (*shape, teacher.num_classes)
            )
            keys = np.full(shape, "", dtype="<U64")
        if len(names) != keys.shape[1]:
            raise ValueError(f"epoch {epoch} step {step}: a global batch of {len(names)} samples, not {keys.shape[1]}")
        out = teacher(images)
        feat[step] = out["feat"].cpu().numpy().astype(dtype)
        logits[step] = out["logits"].cpu().numpy().astype(dtype)
        keys[step] = names
    if feat is None:
        raise ValueError(f"epoch {epoch}: the training stream gave no batches")
    feat.flush()
    logits.flush()
    np.save(tmp / f"e{epoch:04d}-keys.npy", keys)
    log.info("teacher cache: epoch %d, %d steps", epoch + 1, steps)
    return steps


def open_cache(cfg: ExperimentConfig, teacher: Teacher, device, build_allowed: bool = True) -> TeacherCache:
    """The cache ``distill.cache`` asks for: ``build`` rebuilds it, ``use`` builds it only when it is missing."""
    folder = cache_dir(cfg)
    if cfg.distill.cache == "build" or (not (folder / "meta.json").is_file() and build_allowed):
        build_cache(cfg, teacher, folder, device)
    return TeacherCache(folder, teacher, cfg)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m distill.cache", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a distillation config (configs/NAME.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, overrides)
    cfg.distill.check_for_training()
    teacher = load_teacher(cfg, args.device)
    folder = build_cache(cfg, teacher, cache_dir(cfg), args.device)
    print(f"teacher cache: {folder}")
    return folder


if __name__ == "__main__":
    main()
