from pathlib import Path

import datasets

REPO = Path(__file__).resolve().parents[1]


def test_datasets_is_this_repository():
    """`datasets` is also Hugging Face's package name: make sure ours wins."""
    assert Path(datasets.__file__).resolve().parent == REPO / "datasets"
