"""Run-time reporting of the retrieval trainer: log setup, the dataset table, the seed's log line, rank lists."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """INFO to the console and ``run_dir/train.log`` on the main process; warnings only elsewhere."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(console)
    if is_main:
        target = str((run_dir / "train.log").resolve())
        for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            if h.baseFilename != target:  # a previous run in this process: stop writing into its log
                root.removeHandler(h)
                h.close()
        if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
            handler = logging.FileHandler(target)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            root.addHandler(handler)


def manifest_table(manifest: dict, splits: list[str], title: str = "") -> str:
    """The seed's statistics table (subset | # ids | # images | # cameras) from a shard manifest."""
    rule = "  " + "-" * 40
    lines = [f"=> {title} loaded", "Dataset statistics:", rule, "  subset   | # ids | # images | # cameras", rule]
    for name in splits:
        entry = manifest["splits"].get(name)
        if entry is None:
            continue
        cams = entry.get("cameras")
        cam_text = f"{len(cams):9d}" if isinstance(cams, list) else f"{'-':>9}"
        lines.append(f"  {name:<8} | {len(entry['class_counts']):5d} | {entry['count']:8d} | {cam_text}")
    lines.append(rule)
    return "\n".join(lines)


def log_line(epoch: int, step: int, total: int, loss: float, acc: float, lr: float, ips: float) -> str:
    """The seed's per-iteration line plus throughput."""
    return (
        f"Epoch[{epoch}] Iteration[{step}/{total}] Loss: {loss:.3f}, Acc: {acc:.3f}, Base Lr: {lr:.2e}, "
        f"{ips:.1f} images/s"
    )


def _bordered(img: np.ndarray, color: tuple[int, int, int], width: int = 3) -> np.ndarray:
    out = img.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = color, color, color, color
    return out


def rank_list_image(queries: list[np.ndarray], galleries: list[list[np.ndarray]], hits: list[list[bool]]) -> np.ndarray:
    """Rows of query + its top-k gallery images (HWC uint8, same size); green border = same identity, red = not."""
    rows = []
    for query, gals, row_hits in zip(queries, galleries, hits):
        cells = [_bordered(query, (40, 40, 40))]
        cells += [_bordered(g, (0, 200, 0) if ok else (220, 0, 0)) for g, ok in zip(gals, row_hits)]
        gap = np.full((query.shape[0], 6, 3), 255, dtype=np.uint8)
        row = [cells[0], np.full((query.shape[0], 18, 3), 255, dtype=np.uint8)]
        for cell in cells[1:]:
            row += [cell, gap]
        rows.append(np.concatenate(row, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)
