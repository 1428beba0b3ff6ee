"""Does the retrieval trainer learn on real data? mAP of the untrained vs the trained model, same run, CPU.

    python bench/bench_train_quality.py [--task reid|retail|both] [--epochs N] [--work DIR]

reid: mars_mini (train on bbox_train, query/gallery from bbox_test); retail: grocery_store (train on
train/, queries from val/, gallery = iconic images). Both from random initialisation (no weights here).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from configs import load_config
from datasets.prepare import main as prepare_main
from datasets.shards import read_manifest
from inference.evaluate import evaluate_model
from inference.models import build_model
from trainers.checkpoint import seed_everything
from trainers.retrieval import run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = {
    "reid": ("reid_demo", ["data.reader=mars", f"data.root={SHARED / 'mars_mini'}", "eval.protocol=reid"]),
    "retail": (
        "retr_demo",
        [
            "data.reader=grocery",
            f"data.root={SHARED / 'grocery_store'}",
            "data.prepare.gallery_views=0",
            "data.prepare.shard_size=500",
            "data.augment.pad=4",
            "eval.protocol=retail",
        ],
    ),
}


def bench(task: str, epochs: int, work: Path, iters: int = 0) -> dict:
    name, overrides = TASKS[task]
    shards = work / f"shards_{task}"
    overrides = [*overrides, f"data.shards={shards}", f"schedule.epochs={epochs}", f"eval.every={epochs}"]
    overrides += ["schedule.warmup_epochs=1", f"schedule.milestones={max(epochs - 1, 1)}", "data.num_workers=1"]
    overrides += [f"schedule.iters_per_epoch={iters}"]
    cfg = load_config(name, overrides)
    if not (shards / "manifest.json").is_file():
        prepare_main(["--config", name, *overrides, "--no-progress"])
    num_classes = read_manifest(shards)["splits"][cfg.data.train_split]["num_classes"]
    seed_everything(cfg.train.seed)
    untrained = build_model(cfg.model, num_classes, img_size=(cfg.data.height, cfg.data.width)).eval()
    with torch.no_grad():
        before = evaluate_model(untrained, cfg, torch.device("cpu"))
    start = time.perf_counter()
    after = run(cfg, run_dir=str(work / f"run_{task}"))
    return {
        "task": task,
        "backbone": cfg.model.backbone,
        "epochs": epochs,
        "steps": after["global_step"] // epochs,
        "size": cfg.data.height,
        "before": before,
        "after": after,
        "train_s": time.perf_counter() - start,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| task | data | backbone, input | epochs x steps | untrained mAP / R1 | trained mAP / R1 | train+eval time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        data = "mars_mini" if r["task"] == "reid" else "grocery_store"
        lines.append(
            f"| {r['task']} | {data} | {r['backbone']}, {r['size']} px | {r['epochs']} x {r['steps']} | "
            f"{100 * b['mAP']:.1f} / {100 * b['rank1']:.1f} | {100 * a['mAP']:.1f} / {100 * a['rank1']:.1f} | "
            f"{r['train_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["reid", "retail", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=0, help="cap on optimizer steps per epoch (0 = whole epoch)")
    parser.add_argument("--work", default="/tmp/bench_train_quality")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.work)
    tasks = ["reid", "retail"] if args.task == "both" else [args.task]
    rows = [bench(t, args.epochs, work, args.iters) for t in tasks]
    print(table(rows))


if __name__ == "__main__":
    main()
