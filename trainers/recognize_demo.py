"""The recognition demo on the embedded sample, one command: ``python -m trainers.recognize_demo``.

1. trains ``det_demo`` (class-agnostic Cascade R-CNN) and ``retr_demo`` (ResNet-18 retrieval), or reuses
   their best weights when ``WORK/det/mAP*.pth`` and ``WORK/retr/mAP*.pth`` exist;
2. builds the gallery bank from the library images (with flip and box-scale views);
3. recognises the held-out scenes, prints the (a)-(d) table and writes pictures (PNG + TensorBoard).
Trainings run as subprocesses with one intra-op thread (steadier on a shared CPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def best_weights(folder: Path) -> Path | None:
    """The best-weights file ``mAPxx.x.pth`` a trainer exported into ``folder`` (the newest when several)."""
    found = sorted(folder.glob("mAP*.pth"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def train_if_missing(name: str, folder: Path, command: list[str]) -> Path:
    """Reuse ``folder``'s best weights, or run ``command`` (a trainer) and return the weights it exported."""
    found = best_weights(folder)
    if found is not None:
        log.info("%s: reusing %s", name, found)
        return found
    log.info("%s: training (%s)", name, " ".join(command))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *command], cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} training failed (exit {proc.returncode}); its log is under {folder}")
    found = best_weights(folder)
    if found is None:
        raise RuntimeError(f"{name} training exported no mAP*.pth into {folder}")
    return found


def run(work: Path, data_root: Path, det_epochs: int, retr_epochs: int, extra: Sequence[str] = ()) -> int:
    from datasets.sample import ensure_sample

    work, data_root = work.resolve(), data_root.resolve()
    ensure_sample(data_root)
    det = train_if_missing("det_demo", work / "det", [
        "trainers/detection.py", "--config", "det_demo", "--work-dir", str(work / "det"), "--cfg-options",
        f"data_root={data_root}/", f"train_cfg.max_epochs={det_epochs}",
    ])  # fmt: skip
    retr = train_if_missing("retr_demo", work / "retr", [
        "trainers/retrieval.py", "--config", "retr_demo", "--run-dir", str(work / "retr"), f"data.root={data_root}",
        f"data.shards={work / 'shards'}", f"schedule.epochs={retr_epochs}", f"eval.every={retr_epochs}",
    ])  # fmt: skip
    from inference import gallery

    code = gallery.main(["build", "--bank", str(work / "bank"), "--retriever", str(retr), "--views",
                         "flip,scale=0.9:1.1", "--no-progress"])  # fmt: skip
    if code:
        return code
    from trainers import recognize

    query = str(data_root / "query.json")
    return recognize.main([
        "--detector", str(det), "--det-config", "det_demo", "--det-cfg-options", f"data_root={data_root}/",
        "--retriever", str(retr), "--bank", str(work / "bank"), "--images", query, "--split", "test",
        "--eval", query, "--out", str(work / "results.json"), "--tb", str(work / "tb"), *extra,
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.recognize_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/recognize_demo", help="checkpoints, bank, results, pictures")
    parser.add_argument("--data-root", default="data/sample", help="where the embedded sample is (generated)")
    parser.add_argument("--det-epochs", type=int, default=8, help="det_demo epochs when it is trained")
    parser.add_argument("--retr-epochs", type=int, default=4, help="retr_demo epochs when it is trained")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(Path(args.work_dir), Path(args.data_root), args.det_epochs, args.retr_epochs, extra)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
