"""Feature extraction and the evaluation CLI on a generated sample shard set with random-weight models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from configs import load_config
from inference.evaluate import evaluate_model, main, rank_features
from inference.extract import extract_features, sort_by_index
from inference.metrics import evaluate_ranking
from inference.models import build_model, load_model


class FirstColumn(nn.Module):
    """Not flip-invariant: the mean of each channel's first pixel column."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :, 0].mean(2)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def test_extract_orders_by_index_and_flip_averages():
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    batches = [
        {"image": images[1:], "identity": torch.tensor([7]), "camera": torch.tensor([2]), "index": torch.tensor([1])},
        {"image": images[:1], "identity": torch.tensor([5]), "camera": torch.tensor([1]), "index": torch.tensor([0])},
    ]
    out = extract_features(FirstColumn(), batches, "cpu")
    assert out["identity"].tolist() == [5, 7] and out["index"].tolist() == [0, 1] and out["label"].tolist() == [-1, -1]
    assert torch.equal(out["features"], images[:, :, :, 0].mean(2))
    flipped = extract_features(FirstColumn(), batches, "cpu", flip=True)
    assert torch.allclose(flipped["features"], (images[:, :, :, 0].mean(2) + images[:, :, :, -1].mean(2)) / 2)
    with pytest.raises(ValueError, match="sample index 0 was embedded more than once"):
        extract_features(FirstColumn(), batches + batches[1:], "cpu")


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory):
    prepare = pytest.importorskip("datasets.prepare", reason="datasets.prepare (shard writer) is not available")
    root = tmp_path_factory.mktemp("sample")
    overrides = [f"data.root={root / 'raw'}", f"data.shards={root / 'shards'}", "data.num_workers=0"]
    prepare.main(["--config", "retr_demo", "--no-progress", *overrides])
    return overrides


def test_evaluate_model_matches_direct_ranking_and_ranks_split_exactly(sample_shards):
    from datasets.stream import eval_loader

    cfg = load_config("retr_demo", sample_shards)
    torch.manual_seed(0)
    model = TinyNet()
    metrics = evaluate_model(model, cfg, "cpu")
    q = extract_features(model, eval_loader(cfg, cfg.data.query_split), "cpu")
    g = extract_features(model, eval_loader(cfg, cfg.data.gallery_split), "cpu")
    qn, gn = torch.nn.functional.normalize(q["features"]), torch.nn.functional.normalize(g["features"])
    direct = evaluate_ranking((qn, gn), q["identity"], g["identity"], protocol="retail")
    assert metrics.keys() == direct.keys()
    for key, value in direct.items():  # approx takes no lists inside dicts (pytest >= 9)
        assert metrics[key] == pytest.approx(value), key
    assert 0.0 < metrics["mAP"] <= 1.0 and metrics["num_valid_queries"] == len(q["index"])
    # two ranks' shares, joined, are the single-rank extraction: every sample exactly once
    shares = [extract_features(model, eval_loader(cfg, cfg.data.gallery_split, r, 2), "cpu") for r in range(2)]
    joined = sort_by_index({k: torch.cat([s[k] for s in shares]) for k in shares[0]})
    assert torch.equal(joined["index"], g["index"]) and torch.allclose(joined["features"], g["features"], atol=1e-6)


def test_cli_with_random_weights_flip_and_rerank(sample_shards, tmp_path, capsys):
    args = [*sample_shards, "model.backbone=test_resnet", "data.height=32", "data.width=32"]
    cfg = load_config("retr_demo", args)
    weights = tmp_path / "random.pth"
    torch.save(build_model(cfg.model, num_classes=24, img_size=(32, 32)).state_dict(), weights)
    metrics = main(["--config", "retr_demo", "--checkpoint", str(weights), "--flip", "--rerank", *args])
    printed = capsys.readouterr().out
    assert "flip + re-ranking" in printed and "Rank-1" in printed and "mINP" in printed
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
        assert 0.0 <= metrics[key] <= 1.0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(cfg.model, str(tmp_path / "missing.pth"))
    torch.save({"fc.bias": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a retrieval model state_dict"):
        load_model(cfg.model, str(tmp_path / "other.pth"))


def test_empty_split_is_a_clear_error():
    cfg = load_config("retr_demo")
    some = {"features": torch.ones(2, 4), "identity": torch.zeros(2), "camera": torch.zeros(2)}
    none = {"features": torch.zeros(0, 4), "identity": torch.zeros(0), "camera": torch.zeros(0)}
    with pytest.raises(ValueError, match="gallery split .* produced no embeddings"):
        rank_features(some, none, cfg, "cpu")
