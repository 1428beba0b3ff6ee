"""The frozen teacher: a trained retrieval model of any backbone, with its own input size and normalisation.

The teacher is a plain object, not a ``torch.nn.Module`` attribute of anything that trains, so it is never
wrapped by DDP or DeepSpeed, never reached by an optimizer and never written into the student's state files
or ``mAP*.pth``; a resumed run loads it again from its checkpoint.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from configs import ExperimentConfig, from_dict, load_config
from inference.models import RetrievalModel, build_model
from inference.retriever import file_sha256

log = logging.getLogger(__name__)


def resolve_checkpoint(spec: str) -> Path:
    """``distill.teacher_checkpoint``: a file, or a glob (``runs/retr_demo/*/mAP*.pth``) -> its newest match."""
    if not glob.has_magic(spec):
        return Path(spec)
    matches = [Path(p) for p in glob.glob(spec)]
    if not matches:
        raise FileNotFoundError(
            f"distill.teacher_checkpoint={spec!r} matches no file: train the teacher first "
            "(accelerate launch -q trainers/retrieval.py --config <teacher config>) or point to its mAPxx.x.pth"
        )
    newest = max(matches, key=lambda p: p.stat().st_mtime)
    log.info("distill.teacher_checkpoint=%r: the newest of %d matches is %s", spec, len(matches), newest)
    return newest


def load_teacher_config(spec: str, checkpoint: Path) -> ExperimentConfig:
    """``distill.teacher_config``: a config.json (what the teacher was really trained with), a config name,
    or empty: the config.json that the training run wrote beside ``checkpoint``."""
    if not spec:
        spec = str(checkpoint.parent / "config.json")
        if not Path(spec).is_file():
            raise FileNotFoundError(
                f"distill.teacher_config is empty and {spec} does not exist: name the teacher's config "
                "(distill.teacher_config=NAME or a run's config.json)"
            )
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"distill.teacher_config={spec!r} does not exist")
        try:
            data = json.loads(path.read_text())
            data.pop("resolved", None)  # values the run derived (e.g. the scaled lr), not settings
            return from_dict(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"distill.teacher_config={spec!r} is not a config written by a training run: {exc}"
            ) from None
    try:
        return load_config(spec)
    except ValueError as exc:
        raise ValueError(f"distill.teacher_config: {exc}") from None


def read_teacher_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The retrieval model's tensors from an ``mAPxx.x.pth`` or a resumable state (its ``model``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"distill.teacher_checkpoint={str(path)!r} does not exist: train the teacher first "
            "(accelerate launch -q trainers/retrieval.py --config <teacher config>) and point to its mAPxx.x.pth"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not isinstance(state.get("head.weight"), torch.Tensor):
        raise ValueError(f"distill.teacher_checkpoint={str(path)!r} is not a retrieval model (no 'head.weight')")
    return state


@dataclass
class TeacherInput:
    """How the teacher wants its images: size and normalisation."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Teacher:
    """Frozen retrieval model in eval mode; ``teacher(images)`` -> ``{"feat", "embedding", "logits"}``.

    ``images`` are the student's batch (normalised with the student's mean/std at the student's size); they
    are renormalised and resized for the teacher on their device when the two differ.
    """

    def __init__(self, cfg: ExperimentConfig, checkpoint: str | Path, student: ExperimentConfig, device) -> None:
        self.cfg, self.checkpoint = cfg, Path(checkpoint)
        state = read_teacher_weights(checkpoint)
        self.num_classes, self.dim = int(state["head.weight"].shape[0]), int(state["head.weight"].shape[1])
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.pretrained_path, model_cfg.pretrained = "", False  # the checkpoint holds every weight
        size = (cfg.data.height, cfg.data.width)
        model = build_model(model_cfg, self.num_classes, img_size=size)
        if model.dim != self.dim:
            raise ValueError(
                f"distill.teacher_checkpoint={str(checkpoint)!r} holds {self.dim}-dimensional embeddings but its "
                f"config ({cfg.name}: model.backbone={cfg.model.backbone!r}, model.embed_dim={cfg.model.embed_dim}) "
                f"gives {model.dim}: the checkpoint was trained with another model or embedding size"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[:3]
            raise ValueError(
                f"distill.teacher_checkpoint={str(checkpoint)!r} does not fit its config ({cfg.name}: "
                f"model.backbone={cfg.model.backbone!r}): {' '.join(first)}"
            ) from None
        model.requires_grad_(False)
        self.model: RetrievalModel = model.to(device).eval()
        self.input = TeacherInput(cfg.data.height, cfg.data.width, cfg.data.augment.mean, cfg.data.augment.std)
        self._student = TeacherInput(
            student.data.height, student.data.width, student.data.augment.mean, student.data.augment.std
        )
        self._fingerprint = ""
        log.info(
            "teacher %s (%s, %d-d embedding, %d classes, input %dx%d) from %s",
            cfg.name, cfg.model.backbone, self.dim, self.num_classes, self.input.height, self.input.width, checkpoint,
        )  # fmt: skip

    @property
    def fingerprint(self) -> str:
        """sha256 of the checkpoint file: a teacher cache records it and is refused by any other teacher."""
        if not self._fingerprint:
            self._fingerprint = file_sha256(self.checkpoint)
        return self._fingerprint

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The student's normalised batch as the teacher expects it (same tensor when nothing differs)."""
        s, t = self._student, self.input
        if s.mean != t.mean or s.std != t.std:
            # undo the student's normalisation and apply the teacher's, as one affine map per channel
            s_mean, s_std = images.new_tensor(s.mean).view(1, 3, 1, 1), images.new_tensor(s.std).view(1, 3, 1, 1)
            t_mean, t_std = images.new_tensor(t.mean).view(1, 3, 1, 1), images.new_tensor(t.std).view(1, 3, 1, 1)
            images = (images * s_std + s_mean - t_mean) / t_std
        if images.shape[-2:] != (t.height, t.width):
            images = F.interpolate(images, size=(t.height, t.width), mode="bilinear", align_corners=False)
        return images

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        x = self.prepare(images).to(next(model.parameters()).dtype)
        feat = model.embed(model.pooled(x))
        after = model.neck(feat)
        embedding = after if model.neck_feat == "after" else feat
        return {"feat": feat.float(), "embedding": embedding.float(), "logits": model.head(after).float()}

    @torch.no_grad()
    def embedding_of(self, feat: torch.Tensor) -> torch.Tensor:
        """The retrieval embedding of pooled features ``feat`` (a cache stores only these and the logits)."""
        model = self.model
        if model.neck_feat == "before":
            return feat.float()
        return model.neck(feat.to(next(model.parameters()).dtype)).float()


def load_teacher(student: ExperimentConfig, device) -> Teacher:
    """The teacher that ``student.distill`` names, on ``device``."""
    checkpoint = resolve_checkpoint(student.distill.teacher_checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"distill.teacher_checkpoint={str(checkpoint)!r} does not exist: train the teacher first "
            "(accelerate launch -q trainers/retrieval.py --config <teacher config>) and point to its mAPxx.x.pth"
        )
    return Teacher(load_teacher_config(student.distill.teacher_config, checkpoint), checkpoint, student, device)
