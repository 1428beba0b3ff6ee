"""The frozen teacher and its cache: no gradient, own input size and normalisation, clear errors for a checkpoint
that does not fit its config, cached outputs equal to the live teacher's, a cache from another teacher refused."""

import json

import pytest
import torch

from configs import load_config, save_config
from datasets.prepare import main as prepare_main
from datasets.stream import TrainStream
from distill.cache import TeacherCache, build_cache, cache_dir, global_batches
from distill.teacher import load_teacher
from inference.models import build_model
from trainers.distillation import compare_with_live

SMALL = ["model.backbone=test_resnet", "data.num_workers=0", "schedule.epochs=2", "schedule.iters_per_epoch=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    prepare_main(["--config", "retr_demo", f"data.root={root}/raw", f"data.shards={root}/shards", "--no-progress"])
    return root / "shards"


def _teacher_files(folder, *overrides, num_classes=24, seed=0):
    """A teacher run directory as training leaves it: config.json and mAPxx.x.pth (random weights)."""
    cfg = load_config("retr_demo", ["model.backbone=test_resnet", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes, img_size=(cfg.data.height, cfg.data.width))
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.json")
    torch.save(model.state_dict(), folder / "mAP50.0.pth")
    return folder / "mAP50.0.pth", model


def _student(shards, checkpoint, *extra):
    return load_config(
        "distill_demo", [*SMALL, f"data.shards={shards}", f"distill.teacher_checkpoint={checkpoint}", *extra]
    )


def test_teacher_is_frozen_and_matches_its_weights(tmp_path):
    ckpt, model = _teacher_files(tmp_path / "t")
    teacher = load_teacher(_student(tmp_path, tmp_path / "t" / "mAP*.pth"), "cpu")  # glob -> the newest match
    assert teacher.checkpoint == ckpt and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert not isinstance(teacher, torch.nn.Module)  # nothing that holds it can register, wrap or save it
    images = torch.randn(4, 3, 48, 48, requires_grad=True)
    out = teacher(images)
    assert out["feat"].shape == (4, 96) and out["logits"].shape == (4, 24) and not out["feat"].requires_grad
    model.eval()
    with torch.no_grad():  # the student's 48x48 batch is resized to the teacher's 64x64
        expected = model(torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear"))
    assert torch.allclose(out["embedding"], expected, atol=1e-5)
    # what the trainer derives for cached outputs (which store only feat and logits): the same embedding
    assert torch.allclose(teacher.embedding_of(out["feat"]), out["embedding"], atol=1e-5)


def test_teacher_renormalises_the_students_batch(tmp_path):
    _teacher_files(tmp_path / "t", "data.augment.mean=0.5,0.5,0.5", "data.augment.std=0.25,0.25,0.25")
    student = _student(tmp_path, tmp_path / "t" / "mAP50.0.pth", "data.height=64", "data.width=64")
    teacher = load_teacher(student, "cpu")
    pixels = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(student.data.augment.mean), torch.tensor(student.data.augment.std)
    as_student = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(teacher.prepare(as_student), (pixels - 0.5) / 0.25, atol=1e-5)
    same = _student(tmp_path, tmp_path / "t" / "mAP50.0.pth", "data.height=64", "data.width=64",
                    "data.augment.mean=0.5,0.5,0.5", "data.augment.std=0.25,0.25,0.25")  # fmt: skip
    assert load_teacher(same, "cpu").prepare(as_student) is as_student


def test_checkpoint_of_another_model_or_embedding_size_is_refused(tmp_path):
    ckpt, _ = _teacher_files(tmp_path / "t")
    other = tmp_path / "other.json"
    save_config(load_config("retr_demo", ["model.backbone=resnet10t"]), other)
    with pytest.raises(ValueError, match=r"holds 96-dimensional embeddings but its config .*resnet10t.* gives 512"):
        load_teacher(_student(tmp_path, ckpt, f"distill.teacher_config={other}"), "cpu")
    save_config(load_config("retr_demo", ["model.backbone=test_resnet", "model.embed_dim=32"]), other)
    with pytest.raises(ValueError, match="holds 96-dimensional embeddings but its config .*embed_dim=32"):
        load_teacher(_student(tmp_path, ckpt, f"distill.teacher_config={other}"), "cpu")
    save_config(load_config("retr_demo", ["model.backbone=test_resnet", "model.neck=none"]), other)
    with pytest.raises(ValueError, match="does not fit its config"):
        load_teacher(_student(tmp_path, ckpt, f"distill.teacher_config={other}"), "cpu")
    with pytest.raises(FileNotFoundError, match="matches no file: train the teacher first"):
        load_teacher(_student(tmp_path, tmp_path / "none" / "mAP*.pth"), "cpu")
    (tmp_path / "junk.pth").write_bytes(b"")
    torch.save({"x": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="is not a retrieval model"):
        load_teacher(_student(tmp_path, tmp_path / "junk.pth", f"distill.teacher_config={tmp_path / 't/config.json'}"),
                     "cpu")  # fmt: skip


def test_cached_outputs_equal_live_and_another_teacher_is_refused(shards, tmp_path):
    ckpt, _ = _teacher_files(tmp_path / "t")
    cfg = _student(shards, ckpt, "distill.cache=use", f"distill.cache_dir={tmp_path / 'cache'}")
    teacher = load_teacher(cfg, "cpu")
    build_cache(cfg, teacher, cache_dir(cfg), "cpu")
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["teacher_sha256"] == teacher.fingerprint and meta["steps"] == [2, 2]
    cache = TeacherCache(cache_dir(cfg), teacher, cfg)
    stream = TrainStream(cfg, 0, 1)
    try:
        for epoch in (0, 1):  # the same augmented batches the trainer will see, read again from the stream
            for step, keys, images in global_batches(stream.epoch(epoch), 2, cfg.data.augment):
                live = teacher(images)
                cached = cache.lookup(epoch, step, 8, keys[8:16], "cpu")
                for name in ("feat", "logits"):
                    assert torch.allclose(cached[name], live[name][8:16], rtol=2e-3, atol=2e-3), name
                embedding = teacher.embedding_of(cached["feat"])
                assert torch.allclose(embedding, live["embedding"][8:16], rtol=1e-2, atol=1e-2)
                compare_with_live(cache.lookup(epoch, step, 0, keys, "cpu"), live, 0.01, "c", {"epoch": 0, "step": 0})
                with pytest.raises(ValueError, match="made for another batch plan"):
                    cache.lookup(epoch, step, 0, keys[1:] + keys[:1], "cpu")
    finally:
        stream.close()
    with pytest.raises(ValueError, match="differ from the live teacher"):
        noisy = {k: v + 1.0 for k, v in live.items()}
        compare_with_live(noisy, live, 0.02, "c", {"epoch": 1, "step": 1})
    retrained, _ = _teacher_files(tmp_path / "t2", seed=1)
    other = load_teacher(_student(shards, retrained), "cpu")
    with pytest.raises(ValueError, match="was made by teacher checkpoint .* refusing it"):
        TeacherCache(cache_dir(cfg), other, cfg)
    with pytest.raises(ValueError, match=r"made for other training batches \(differs in \['seed'\]\)"):
        TeacherCache(cache_dir(cfg), teacher, _student(shards, ckpt, f"distill.cache_dir={tmp_path / 'cache'}",
                                                       "train.seed=5"))  # fmt: skip
