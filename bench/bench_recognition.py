"""Recognition benchmarks (results in BENCHMARKS.md).

``--sample``: the seed's claim on the embedded sample, in one run at the same detector budget: det_demo trained
per class (row b) against det_demo trained class-agnostic + retrieval relabelling (row c), with rows (a) and (d)
of both. Trains what is missing under ``--work-dir`` (det_demo twice, retr_demo once), else reuses it.

``--grocery``: Grocery Store, the iconic images as the bank, the val photos as queries (the whole photo as the
box): relabelling accuracy of a trained retriever against an untrained one (same config, random weights), and
the recogniser's images/s with the PyTorch and the ONNX retriever, all in one run.

    python bench/bench_recognition.py --sample --work-dir runs/bench
    python bench/bench_recognition.py --grocery --retriever runs/bench/retr_grocery/mAPxx.x.pth
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import gallery  # noqa: E402
from inference.bankstore import read_version  # noqa: E402
from inference.crops import ViewConfig  # noqa: E402
from inference.match import MatchOptions  # noqa: E402
from inference.recognize import QueryImage, recognize  # noqa: E402
from inference.retriever import load_retriever  # noqa: E402

log = logging.getLogger("bench_recognition")


def versions() -> str:
    import faiss
    import onnxruntime
    import timm

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"faiss {faiss.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} threads"
    )


def sample(work: Path, data_root: Path, epochs: int) -> None:
    from trainers import recognize as det_recognize
    from trainers.recognize_demo import train_if_missing

    data_root = data_root.resolve()
    dets = {}
    for name, agnostic in (("det_agnostic", True), ("det_perclass", False)):
        dets[name] = train_if_missing(name, work / name, [
            "trainers/detection.py", "--config", "det_demo", "--work-dir", str(work / name), "--cfg-options",
            f"data_root={data_root}/", f"class_agnostic={agnostic}", f"train_cfg.max_epochs={epochs}",
        ])  # fmt: skip
    retr = train_if_missing("retr_demo", work / "retr_demo", [
        "trainers/retrieval.py", "--config", "retr_demo", "--run-dir", str(work / "retr_demo"),
        f"data.root={data_root}",
    ])  # fmt: skip
    bank = work / "bank_sample"
    gallery.main(["build", "--bank", str(bank), "--retriever", str(retr), "--views", "flip,scale=0.9:1.1",
                  "--no-progress"])  # fmt: skip
    query = str(data_root / "query.json")
    for name, agnostic in (("det_agnostic", True), ("det_perclass", False)):
        print(f"\n## {name}: {dets[name]}  (retriever {retr})")
        det_recognize.main([
            "--detector", str(dets[name]), "--det-config", "det_demo", "--det-cfg-options", f"data_root={data_root}/",
            f"class_agnostic={agnostic}", "--retriever", str(retr), "--bank", str(bank), "--images", query,
            "--split", "test", "--eval", query, "--out", str(work / f"results_{name}.json"), "--pictures", "4",
            "--no-progress",
        ])  # fmt: skip


def untrained_copy(checkpoint: Path, folder: Path) -> Path:
    """The same model and config with random weights (seed 0), saved like the trainer's best weights."""
    from configs import save_config
    from inference.models import build_model
    from inference.retriever import read_run_config

    cfg = read_run_config(checkpoint)
    num_classes = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["head.weight"].shape[0])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes, img_size=(cfg.data.height, cfg.data.width))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "mAP0.0.pth")
    save_config(cfg, folder / "config.json")
    return folder / "mAP0.0.pth"


def grocery(checkpoint: Path, root: Path, work: Path) -> None:
    from datasets.folders import read_grocery
    from inference.export import export_checkpoint

    splits = read_grocery(root)
    queries = [QueryImage(i + 1, Path(r.path)) for i, r in enumerate(splits["query"])]
    truth = {i + 1: r.identity for i, r in enumerate(splits["query"])}
    onnx_file = work / "grocery_trained.onnx"
    export_checkpoint(str(checkpoint), onnx_file)
    runs = {"trained": checkpoint, "untrained": untrained_copy(checkpoint, work / "grocery_untrained"),
            "trained (ONNX)": onnx_file}  # fmt: skip
    print(f"\nGrocery Store: {len(splits['gallery'])} iconic images (bank), {len(queries)} val photos; {versions()}")
    print("| retriever | relabel accuracy | top-5 accuracy | images/s | embed s | match s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, path in runs.items():
        retriever = load_retriever(path)
        bank = work / f"bank_grocery_{name.split()[0]}"
        if name != "trained (ONNX)":
            gallery.build(splits["gallery"], retriever, bank, ViewConfig(flip=True), progress=False)
        run = recognize(queries, retriever, read_version(bank), MatchOptions(topk=5), "whole", progress=False)
        top1 = sum(r["category_id"] == truth[r["image_id"]] for r in run.results) / len(queries)
        top5 = sum(truth[r["image_id"]] in [a["category_id"] for a in r["alternatives"]] for r in run.results)
        s = run.seconds
        print(f"| {name} | {100 * top1:.1f} % | {100 * top5 / len(queries):.1f} % | "
              f"{run.images / s['total']:.1f} | {s['embed']:.1f} | {s['match']:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--grocery", action="store_true")
    parser.add_argument("--work-dir", default="runs/bench")
    parser.add_argument("--data-root", default="data/sample")
    parser.add_argument("--det-epochs", type=int, default=8)
    parser.add_argument("--retriever", default=None, help="--grocery: the trained grocery retrieval weights")
    parser.add_argument("--grocery-root", default="../shared/data/grocery_store")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work_dir)
    print(versions())
    if args.sample:
        sample(work, Path(args.data_root), args.det_epochs)
    if args.grocery:
        if not args.retriever:
            parser.error("--grocery needs --retriever (train one: see BENCHMARKS.md)")
        grocery(Path(args.retriever), Path(args.grocery_root), work)


if __name__ == "__main__":
    main()
