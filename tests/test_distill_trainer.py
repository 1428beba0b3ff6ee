"""Distillation through the retrieval trainer's loop, end to end on CPU: a teacher trained by the loop, then
distill_demo; the teacher never trains and is absent from every saved file; kill and resume ends where the
uninterrupted run ends; 2 processes via ``accelerate launch``; the launcher; the Swin-B -> ResNet50-IBN config."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import load_config, save_config
from datasets.prepare import main as prepare_main
from inference.models import build_model, load_model
from tests.conftest import REPO
from trainers import checkpoint as ckpt
from trainers.retrieval import run

FAST = ["model.backbone=test_resnet", "data.batch_size=16", "data.num_instances=4", "data.num_workers=0",
        "schedule.warmup_epochs=1", "schedule.milestones=1", "train.log_every=1"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Shards of the embedded sample and a test_resnet teacher trained 3 steps by the loop (its mAPxx.x.pth)."""
    root = tmp_path_factory.mktemp("distill")
    prepare_main(["--config", "retr_demo", f"data.root={root}/raw", f"data.shards={root}/shards", "--no-progress"])
    over = [*FAST, f"data.shards={root}/shards", "schedule.epochs=1", "schedule.iters_per_epoch=3"]
    out = run(load_config("retr_demo", over), run_dir=str(root / "teacher"))
    return root, Path(out["best_path"])


def _cfg(teacher, *extra):
    root, best = teacher
    return load_config("distill_demo", [
        *FAST, f"data.shards={root}/shards", f"distill.teacher_checkpoint={best}", "model.embed_dim=32",
        "schedule.epochs=2", "schedule.iters_per_epoch=3", "checkpoint.every_steps=2", "eval.every=0", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    out = run(_cfg(teacher), run_dir=str(run_dir))
    return run_dir, out


def test_teacher_does_not_train_and_is_absent_from_saved_files(teacher, reference):
    _, best = teacher
    run_dir, out = reference
    assert out["global_step"] == 6
    text = (run_dir / "train.log").read_text()
    assert "student test_resnet (32-d) <- teacher test_resnet (96-d)" in text
    state = ckpt.load_state(ckpt.list_states(run_dir / "checkpoints")[-1])
    student = build_model(_cfg(teacher).model, 24, img_size=(48, 48))
    assert state["model"].keys() == student.state_dict().keys()  # the student's tensors, nothing else
    assert sorted(state["criterion"]) == ["base.center.centers", "kd.proj.weight"]  # the projection resumes
    assert state["extra_optimizer"]["state"]  # and so does its optimizer
    # the best weights are the plain student: the evaluator loads them into the student's model, strictly
    mine = load_model(_cfg(teacher).model, out["best_path"], img_size=(48, 48))
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in student.parameters())
    for name in ("kd_kl", "kd_embed", "kd_relation", "ce", "triplet", "center"):
        assert f"train/{name}" in _scalars(run_dir), name


def _scalars(run_dir: Path) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (run_dir / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_teacher_weights_and_grads_untouched_by_training(teacher, tmp_path, monkeypatch):
    import trainers.distillation as distill_trainer

    seen = {}
    build = distill_trainer.load_teacher

    def capture(*args, **kwargs):
        seen["teacher"] = build(*args, **kwargs)
        seen["before"] = {k: v.clone() for k, v in seen["teacher"].model.state_dict().items()}
        return seen["teacher"]

    monkeypatch.setattr(distill_trainer, "load_teacher", capture)
    run(_cfg(teacher, "schedule.epochs=1", "schedule.iters_per_epoch=2", "eval.enabled=false"), str(tmp_path))
    model = seen["teacher"].model
    assert not model.training and all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, seen["before"][key]), key  # BN running statistics too


def test_kill_and_resume_matches_uninterrupted(teacher, reference, tmp_path):
    run_dir, _ = reference
    assert run(_cfg(teacher), run_dir=str(tmp_path), max_steps=4)["ended"] == "max_steps"
    resumed = run(_cfg(teacher), run_dir=str(tmp_path), resume="auto")
    assert resumed["global_step"] == 6 and "resumed from" in (tmp_path / "train.log").read_text()
    a = ckpt.load_state(ckpt.list_states(run_dir / "checkpoints")[-1])
    b = ckpt.load_state(ckpt.list_states(tmp_path / "checkpoints")[-1])
    for part in ("model", "criterion"):
        for key, value in a[part].items():
            assert torch.allclose(value.float(), b[part][key].float(), atol=1e-6, rtol=0), (part, key)


def test_cached_teacher_run_equals_live_run(teacher, tmp_path):
    live = run(_cfg(teacher, "schedule.epochs=1", "eval.enabled=false"), run_dir=str(tmp_path / "live"))
    cached = run(_cfg(teacher, "schedule.epochs=1", "eval.enabled=false", "distill.cache=use",
                      "distill.cache_dtype=float32", f"distill.cache_dir={tmp_path / 'cache'}"),
                 run_dir=str(tmp_path / "cached"))  # fmt: skip
    assert live["global_step"] == cached["global_step"] == 3
    assert "teacher cache matches the live teacher" in (tmp_path / "cached" / "train.log").read_text()
    a = ckpt.load_state(ckpt.list_states(tmp_path / "live" / "checkpoints")[-1])["model"]
    b = ckpt.load_state(ckpt.list_states(tmp_path / "cached" / "checkpoints")[-1])["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_logit_distillation_needs_the_teachers_classes(teacher, tmp_path):
    root, best = teacher
    other = tmp_path / "t"
    cfg = load_config("retr_demo", ["model.backbone=test_resnet"])
    other.mkdir()
    save_config(cfg, other / "config.json")
    torch.save(build_model(cfg.model, 7, img_size=(64, 64)).state_dict(), other / "mAP1.0.pth")
    with pytest.raises(ValueError, match="the teacher has 7, the training split 24"):
        run(_cfg(teacher, f"distill.teacher_checkpoint={other / 'mAP1.0.pth'}"), run_dir=str(tmp_path / "r"))


def test_logit_distillation_with_a_margin_head_is_refused(teacher, tmp_path):
    """A margin head's training logits hold the margin, the teacher's do not: the KL would compare unlike logits."""
    with pytest.raises(ValueError, match="needs model.head=linear; the student's model.head='amsoftmax'"):
        run(_cfg(teacher, "model.head=amsoftmax"), run_dir=str(tmp_path / "r"))


def test_two_processes_through_accelerate_launch_with_the_teacher_cache(teacher, tmp_path):
    """The cache is built as one rank (the global batches do not depend on the world size); each of the two
    ranks reads its slice of every global batch and checks it against its live teacher."""
    root, best = teacher
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", "trainers/retrieval.py", "--config", "distill_demo", "--run-dir", str(tmp_path),
           *FAST, f"data.shards={root}/shards", f"distill.teacher_checkpoint={best}", "schedule.epochs=1",
           "schedule.iters_per_epoch=2", "eval.enabled=false", "distill.cache=use",
           f"distill.cache_dir={tmp_path / 'cache'}", "distill.cache_check_batches=2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()
    assert "2 process(es)" in log and "Iteration[2/2]" in log and "teacher retr_demo" in log
    assert "teacher cache matches the live teacher at epoch 0 step 1" in log
    assert (tmp_path / "cache" / "meta.json").is_file()


@pytest.mark.slow
def test_launcher_runs_distill_demo_on_the_local_executor(teacher, tmp_path):
    from launch import jobs
    from launch.slurm import main

    root, best = teacher
    over = [*FAST, f"data.shards={root}/shards", f"distill.teacher_checkpoint={best}", "schedule.epochs=1",
            "schedule.iters_per_epoch=2", "eval.enabled=false", f"output_dir={tmp_path}", "launch.cpu_tasks=2",
            "launch.cpus_per_task=1", "launch.time_min=10"]  # fmt: skip
    assert main(["--config", "distill_demo", "--cluster", "local", "--wait", "0", *over]) == 0
    (folder,) = [p for p in (tmp_path / "distill_demo").iterdir() if p.is_dir()]
    job, _ = jobs.load_job(folder.name, tmp_path)
    assert jobs.wait_done(job, 400), "the distillation job did not finish"
    text = (folder / "train.log").read_text()
    assert "2 process(es)" in text and "Iteration[2/2]" in text and "distillation:" in text


@pytest.mark.slow
def test_swinb_into_r50ibn_config_runs(teacher, tmp_path):
    """The mission's config as shipped (Swin-B 224 teacher, ResNet50-IBN-a 256x128 student), on the sample's
    shards with a small batch; the teacher is a Swin-B with random weights saved the way training saves it."""
    root, _ = teacher
    t_cfg = load_config("reid_swinb", [f"data.shards={root}/shards", "data.reader=sample"])
    t_cfg.model.pretrained_path = ""
    (tmp_path / "t").mkdir()
    save_config(t_cfg, tmp_path / "t" / "config.json")
    torch.save(build_model(t_cfg.model, 24, img_size=(224, 224)).state_dict(), tmp_path / "t" / "mAP1.0.pth")
    cfg = load_config("distill_swinb_r50ibn", [
        f"data.shards={root}/shards", "data.reader=sample", "model.pretrained_path=", "data.batch_size=8",
        "data.num_workers=0", "schedule.epochs=1", "schedule.iters_per_epoch=1", "eval.enabled=false",
        f"distill.teacher_checkpoint={tmp_path / 't' / 'mAP*.pth'}", "train.precision=no",
    ])  # fmt: skip
    out = run(cfg, run_dir=str(tmp_path / "run"))
    assert out["global_step"] == 1
    text = (tmp_path / "run" / "train.log").read_text()
    assert "student resnet50_ibn_a (2048-d) <- teacher swin_base_patch4_window7_224 (1024-d)" in text
    assert glob.glob(str(tmp_path / "run" / "checkpoints" / "state-*.pt"))


@pytest.mark.slow  # three 2-process DeepSpeed starts: about 40 s on 2 cores
def test_deepspeed_distillation_resumes_where_the_uninterrupted_run_ends(teacher, tmp_path):
    """ZeRO-2 wraps the student only (the teacher stays outside, frozen); the projection's own optimizer and the
    student's sharded state resume, so a run stopped after step 4 and resumed ends with the uninterrupted run's
    student, projection and evaluation."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")  # Accelerate's DeepSpeed plugin imports its HfDeepSpeedConfig
    root, best = teacher
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # DeepSpeed's CPU accelerator instead
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = ["--config", "distill_demo", *FAST, f"data.shards={root}/shards", f"distill.teacher_checkpoint={best}",
            "model.embed_dim=32", "schedule.epochs=2", "schedule.iters_per_epoch=3", "checkpoint.every_steps=2",
            "eval.every=0", f"train.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}"]  # fmt: skip

    def torchrun(run_dir, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "trainers/retrieval.py", *args, "--run-dir", str(run_dir), *extra]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    torchrun(tmp_path / "full")
    torchrun(tmp_path / "cut", "--max-steps", "4")
    torchrun(tmp_path / "cut", "--resume", "auto")
    text = {name: (tmp_path / name / "train.log").read_text() for name in ("full", "cut")}
    assert "2 process(es)" in text["full"] and "distillation:" in text["full"]
    assert "resumed from" in text["cut"] and "(global step 4)" in text["cut"]
    a, b = (ckpt.load_state(tmp_path / name / "checkpoints" / "state-000000006.pt") for name in ("full", "cut"))
    student = build_model(_cfg(teacher).model, 24, img_size=(48, 48))
    assert a["model"].keys() == student.state_dict().keys()  # the student's tensors, no teacher's
    assert a["optimizer"] == {"zero": "state-000000006.zero"} and sorted(a["criterion"]) == [
        "base.center.centers", "kd.proj.weight"]  # fmt: skip
    for part in ("model", "criterion"):
        for key, value in a[part].items():
            assert torch.allclose(value.float(), b[part][key].float(), atol=1e-6, rtol=0), (part, key)
    assert all("Validation Results" in t for t in text.values())
    results = [t[t.index("Validation Results") :].splitlines()[0] for t in text.values()]
    assert results[0] == results[1]
