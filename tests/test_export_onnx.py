"""ONNX export with a dynamic batch for every backbone family, parity through onnxruntime, and the recogniser's
use of the exported file (same fingerprint as its checkpoint; a config mismatch is a clear error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer

from configs import ModelConfig
from inference.export import export_onnx, main, max_abs_diff
from inference.retriever import load_retriever
from tests.recognition_helpers import make_retriever_run

pytest.importorskip("onnxruntime")

# Bounds on the max abs difference of embeddings (float32; the BNNeck output is O(1)): measured differences
# are 1e-7..1e-5, so a wrong export (a missing norm, a batch-fixed reshape) is far above them.
BOUNDS = {"resnet": 1e-4, "resnet_ibn_a": 1e-4, "swin": 1e-4}


def tiny_backbone(family: str) -> torch.nn.Module:
    from inference.ibn import ResNetIBN

    if family == "resnet":
        return timm.create_model("test_resnet", num_classes=0)
    if family == "resnet_ibn_a":
        return ResNetIBN((1, 1, 1, 1))  # IBN-a blocks with InstanceNorm in layers 1-3
    return SwinTransformer(img_size=(64, 64), patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                           num_heads=(1, 2), num_classes=0)  # fmt: skip


@pytest.mark.parametrize("family", sorted(BOUNDS))
def test_parity_through_onnxruntime_with_a_dynamic_batch(family):
    from inference.models import RetrievalModel

    torch.manual_seed(0)
    model = RetrievalModel(tiny_backbone(family), ModelConfig(), num_classes=5).eval()
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    data = export_onnx(model, 64, 64)  # traced with a batch of 2
    for batch in (1, 5):
        images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        assert max_abs_diff(model, data, images) < BOUNDS[family]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    ckpt = make_retriever_run(folder / "run", Path("data/sample"))
    out = folder / "model.onnx"
    assert main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    return ckpt, out


def test_exported_file_embeds_like_its_checkpoint(exported):
    from PIL import Image

    ckpt, onnx_file = exported
    torch_r, onnx_r = load_retriever(ckpt), load_retriever(onnx_file)
    assert onnx_r.fingerprint == torch_r.fingerprint  # a bank built with the .pth accepts the .onnx
    crops = [Image.new("RGB", (40 + 7 * i, 60), (30 * i, 200 - 20 * i, 90)) for i in range(3)]
    assert (torch_r.embed(crops) - onnx_r.embed(crops)).abs().max() < 1e-4
    # a gallery built from the file alone crops the library as the run's training did (retr_demo pads 5 %)
    from inference.crops import crop_settings

    assert torch_r.cfg.data.prepare.padding == 0.05 and torch_r.cfg.data.prepare.max_side == 128
    assert crop_settings(onnx_r.cfg.data.prepare) == crop_settings(torch_r.cfg.data.prepare)


def test_onnx_that_does_not_match_the_config_is_an_error(exported):
    _, onnx_file = exported
    with pytest.raises(ValueError, match="does not match the config: input.height: file 64 vs config 96"):
        load_retriever(onnx_file, "retr_demo", ["model.backbone=test_resnet", "data.height=96"])
    with pytest.raises(ValueError, match="model.backbone: file 'test_resnet' vs config 'resnet18'"):
        load_retriever(onnx_file, "retr_demo")


def test_export_errors_are_reported_without_traceback(tmp_path, caplog):
    assert main(["--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in caplog.text


def test_overrides_or_a_mistyped_option_without_config_are_refused(exported, tmp_path, capsys):
    ckpt, _ = exported
    for extra in (["data.height=96"], ["--chek", "0"]):
        with pytest.raises(SystemExit) as err:
            main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), *extra])
        assert err.value.code == 2 and "need --config" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_foreign_onnx_is_checked_against_the_config_shapes(tmp_path):
    from inference.models import build_model

    cfg_args = ["model.backbone=test_resnet"]
    from configs import load_config

    cfg = load_config("retr_demo", cfg_args)
    model = build_model(cfg.model, 3, img_size=(64, 64)).eval()
    path = tmp_path / "foreign.onnx"
    path.write_bytes(export_onnx(model, 64, 64))  # no spec in its metadata
    with pytest.raises(ValueError, match="carries no model spec"):
        load_retriever(path)
    with pytest.raises(ValueError, match=r"input shape .* does not match the config's \[batch, 3, 96, 64\]"):
        load_retriever(path, "retr_demo", [*cfg_args, "data.height=96"])
    with pytest.raises(ValueError, match="embedding size 32"):
        load_retriever(path, "retr_demo", [*cfg_args, "model.embed_dim=32"])
    assert load_retriever(path, "retr_demo", cfg_args).fingerprint.dim == model.dim
