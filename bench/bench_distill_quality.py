"""Does distillation help on real data? Teacher, student alone and student distilled, CPU, random init.

    python bench/bench_distill_quality.py [--task SETUP,...|all] [--seeds 0,1,2,3] [--work DIR]

reid: mars_mini (config reid_demo); retail: grocery_store (config retr_demo); the data settings are those of
bench/bench_train_quality.py. Per setup a teacher (a larger backbone, trained 2-6x as long) is trained once;
then for each seed the student alone and the student distilled (``trainer=distill``) train with the same
budget, seed, batches and initial weights, so each pair differs only in the distillation terms. ``cross``:
a small Swin teacher into the ResNet student on mars_mini. ``retail_long`` / ``reid_long``: the same with a teacher
trained 24 epochs (the 8-epoch retail one is barely ahead of the student); they share their set's student-alone
runs. Every run goes through trainers/retrieval.py's
``run``. Results are appended to ``<work>/results.jsonl`` as they come, then tabulated with the student's
embedding speed-up over its teacher (bench/bench_distill_speed.py, same process).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

from bench.bench_distill_speed import compare
from bench.bench_train_quality import TASKS
from configs import load_config
from datasets.prepare import main as prepare_main
from trainers.retrieval import run

log = logging.getLogger("bench_distill_quality")
SHARED = Path(os.environ.get("DETRETR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# (task, base task, teacher backbone, teacher epochs, student backbone, student epochs, steps per epoch cap)
SETUPS = {
    "reid": ("reid", "resnet34", 12, "resnet18", 4, 0),
    "reid_long": ("reid", "resnet34", 24, "resnet18", 4, 0),
    "retail": ("retail", "resnet34", 8, "resnet18", 4, 30),
    "retail_long": ("retail", "resnet34", 24, "resnet18", 4, 30),
    "cross": ("reid", "swin_tiny_patch4_window7_224", 4, "resnet18", 4, 0),
}
KD = ["distill.temperature=4", "distill.kl_weight=1", "distill.embed_weight=1", "distill.relation_weight=1",
      "distill.embed_loss=cosine", "distill.relation=similarity"]  # fmt: skip


def overrides(task: str, work: Path, backbone: str, epochs: int, iters: int, seed: int) -> tuple[str, list[str]]:
    name, base = TASKS[task]
    return name, [
        *base,
        f"data.root={SHARED / ('mars_mini' if task == 'reid' else 'grocery_store')}",
        f"data.shards={work / f'shards_{task}'}",
        "data.num_workers=1",
        f"model.backbone={backbone}",
        f"schedule.epochs={epochs}",
        "schedule.warmup_epochs=1",
        f"schedule.milestones={max(epochs - 1, 1)}",
        f"schedule.iters_per_epoch={iters}",
        f"eval.every={epochs}",
        f"train.seed={seed}",
        "checkpoint.every_steps=100000",
        "train.log_every=20",
    ]


def _claimed_elsewhere(run_dir: Path) -> bool:
    """Two bench processes (e.g. ``--task reid`` and ``--task cross``) share the student-alone runs: the first
    to claim a run trains it, the other waits for its result."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(run_dir / f".claim-{os.getpid()}", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    claims = sorted(run_dir.glob(".claim-*"), key=lambda p: p.stat().st_mtime)
    return claims[0].name != f".claim-{os.getpid()}" and _alive(int(claims[0].name.split("-")[1]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def train(name: str, extra: list[str], run_dir: Path, record: dict, results: Path) -> dict:
    if _claimed_elsewhere(run_dir):
        log.info("waiting for another bench process to finish %s", run_dir)
        while not (run_dir / "result.json").is_file():
            time.sleep(20)
    if (run_dir / "result.json").is_file():  # a rerun continues where an earlier one stopped
        return json.loads((run_dir / "result.json").read_text())
    cfg = load_config(name, extra)
    start = time.perf_counter()
    out = run(cfg, run_dir=str(run_dir), resume="auto")  # an interrupted run continues from its last state
    row = {**record, "mAP": out["mAP"], "rank1": out["rank1"], "train_s": time.perf_counter() - start}
    row["best_path"] = out["best_path"]
    (run_dir / "result.json").write_text(json.dumps(row))
    with results.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    log.info("%s", row)
    return row


def bench(setup: str, seeds: list[int], work: Path) -> list[dict]:
    task, t_bb, t_ep, s_bb, s_ep, iters = SETUPS[setup]
    results = work / "results.jsonl"
    name, base = overrides(task, work, t_bb, t_ep, iters, 0)
    if not (work / f"shards_{task}" / "manifest.json").is_file():
        prepare_main(["--config", name, *base, "--no-progress"])
    teacher = train(name, base, work / f"{setup}_teacher", {"setup": setup, "role": "teacher", "seed": 0}, results)
    rows = [teacher]
    for seed in seeds:
        name, student = overrides(task, work, s_bb, s_ep, iters, seed)
        record = {"setup": setup, "seed": seed}
        alone_dir = work / f"{task}_student_alone_s{seed}"  # the cross setup shares its task's alone runs
        rows.append(train(name, student, alone_dir, {**record, "role": "alone"}, results))
        kd = [*student, "trainer=distill", f"distill.teacher_checkpoint={teacher['best_path']}", *KD]
        rows.append(train(name, kd, work / f"{setup}_student_kd_s{seed}", {**record, "role": "distilled"}, results))
    return [{**r, "setup": setup} for r in rows]  # the alone runs a setup shares are its rows too


def from_results(work: Path) -> list[dict]:
    """The rows of every setup from ``results.jsonl`` (a setup's student-alone runs may carry another setup's
    name: the setups of one task share them)."""
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for setup, (task, *_) in SETUPS.items():
        for r in rows:
            shared = r["role"] == "alone" and SETUPS[r["setup"]][0] == task
            if r["setup"] == setup or shared:
                out.append({**r, "setup": setup})
    return [r for r in out if any(x["setup"] == r["setup"] and x["role"] == "distilled" for x in out)]


def speedups(setups: list[str], work: Path) -> dict[str, float]:
    """Student / teacher embedding images/s of each setup at its input size (same process, alternating)."""
    out = {}
    for setup in setups:
        task, t_bb, t_ep, s_bb, s_ep, iters = SETUPS[setup]
        t_cfg = load_config(*overrides(task, work, t_bb, t_ep, iters, 0))
        s_cfg = load_config(*overrides(task, work, s_bb, s_ep, iters, 0))
        out[setup] = compare(s_cfg, t_cfg, batch=64, rounds=5)["speedup"]
    return out


def _stat(rows: list[dict], key: str) -> str:
    values = [100 * r[key] for r in rows]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _gains(by: dict) -> str:
    """Distilled minus alone mAP for each seed (the pair shares its initial weights and batches)."""
    alone = {r["seed"]: r["mAP"] for r in by["alone"]}
    return ", ".join(f"{100 * (r['mAP'] - alone[r['seed']]):+.1f}" for r in by["distilled"] if r["seed"] in alone)


def table(rows: list[dict], speed: dict[str, float]) -> str:
    lines = [
        "| setup | data, input | teacher (epochs) -> student (epochs) | teacher mAP / R1 | student alone mAP / R1 | "
        "student distilled mAP / R1 | mAP gain per seed | student speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setup in dict.fromkeys(r["setup"] for r in rows):
        mine = [r for r in rows if r["setup"] == setup]
        by = {role: [r for r in mine if r["role"] == role] for role in ("teacher", "alone", "distilled")}
        task, t_bb, t_ep, s_bb, s_ep, _ = SETUPS[setup]
        data = "mars_mini, 64x32" if task == "reid" else "grocery_store, 64x64"
        cells = [f"{_stat(by[k], 'mAP')} / {_stat(by[k], 'rank1')}" for k in ("teacher", "alone", "distilled")]
        lines.append(
            f"| {setup} | {data} | {t_bb} ({t_ep}) -> {s_bb} ({s_ep}) | {' | '.join(cells)} | {_gains(by)} | "
            f"x{speed[setup]:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="all", help="comma-separated setups (a key of SETUPS) or all")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--work", default="/tmp/bench_distill_quality")
    parser.add_argument("--table-only", action="store_true", help="tabulate <work>/results.jsonl, train nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    setups = list(SETUPS) if args.task == "all" else args.task.split(",")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; choose from {sorted(SETUPS)}")
    if not args.table_only:
        for setup in setups:
            bench(setup, seeds, work)
    rows = [r for r in from_results(work) if r["setup"] in setups]
    text = table(rows, speedups(list(dict.fromkeys(r["setup"] for r in rows)), work))
    (work / f"table_{'_'.join(setups)}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
