"""Embedding speed of a distillation config's teacher and student, side by side in one process (images/s).

    python bench/bench_distill_speed.py [--config distill_swinb_r50ibn] [--teacher-config reid_swinb]
        [--batch 32] [--rounds 5] [--device cpu]

Each model runs in eval mode without gradients at its own config's input size, on random weights (speed
does not depend on the weights). The two alternate round by round, so load on a shared machine hits both;
the figure is the median over the rounds, and the speed-up is student / teacher.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from configs import ExperimentConfig, load_config
from inference.models import build_model

# the teacher each shipped distillation config is written for (its checkpoint's config.json says the same)
TEACHERS = {"distill_demo": "retr_demo", "distill_swinb_r50ibn": "reid_swinb"}


def _model(cfg: ExperimentConfig, device) -> torch.nn.Module:
    cfg.model.pretrained_path, cfg.model.pretrained = "", False
    model = build_model(cfg.model, num_classes=16, img_size=(cfg.data.height, cfg.data.width))
    return model.to(device).eval()


def _images_per_s(model: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(images)
        if images.is_cuda:
            torch.cuda.synchronize()
    return images.shape[0] / (time.perf_counter() - start)


def compare(student: ExperimentConfig, teacher: ExperimentConfig, batch: int, rounds: int, device="cpu") -> dict:
    """Median images/s of each model over ``rounds`` alternating rounds (one warm-up round first)."""
    models = {"teacher": (_model(teacher, device), teacher), "student": (_model(student, device), student)}
    inputs = {k: torch.randn(batch, 3, c.data.height, c.data.width, device=device) for k, (_, c) in models.items()}
    speeds: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds + 1):
        for name, (model, _) in models.items():
            speed = _images_per_s(model, inputs[name])
            if r:  # round 0 warms up
                speeds[name].append(speed)
    out = {}
    for name, (_, cfg) in models.items():
        out[name] = {
            "backbone": cfg.model.backbone,
            "size": f"{cfg.data.height}x{cfg.data.width}",
            "images_per_s": statistics.median(speeds[name]),
        }
    out["speedup"] = out["student"]["images_per_s"] / out["teacher"]["images_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="distill_swinb_r50ibn")
    parser.add_argument("--teacher-config", default="", help="default: the config's usual teacher")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    student = load_config(args.config)
    teacher = load_config(args.teacher_config or TEACHERS[args.config])
    r = compare(student, teacher, args.batch, args.rounds, args.device)
    print(f"{args.config} on {args.device}, batch {args.batch}, median of {args.rounds} alternating rounds")
    print("| model | backbone | input | images/s |\n| --- | --- | --- | --- |")
    for name in ("teacher", "student"):
        m = r[name]
        print(f"| {name} | {m['backbone']} | {m['size']} | {m['images_per_s']:.1f} |")
    print(f"student speed-up: x{r['speedup']:.2f}")


if __name__ == "__main__":
    main()
