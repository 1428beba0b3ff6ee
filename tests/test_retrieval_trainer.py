"""The retrieval trainer end to end on CPU: kill-and-resume equality, signals, bad input, NaN steps."""

import json
import os
import signal

import pytest
import torch

from configs import load_config
from datasets.prepare import main as prepare_main
from datasets.stream import TrainStream
from trainers import checkpoint as ckpt
from trainers.retrieval import exit_code, run
from trainers.setup import check_data

FAST = [
    "model.backbone=test_resnet",
    "data.height=32",
    "data.width=32",
    "data.batch_size=16",
    "data.num_instances=4",
    "data.num_workers=0",
    "schedule.epochs=2",
    "schedule.warmup_epochs=1",
    "schedule.iters_per_epoch=3",
    "schedule.milestones=1",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=2",
    "train.log_every=1",
    "eval.enabled=false",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    prepare_main(["--config", "retr_demo", f"data.root={root}/raw", f"data.shards={root}/shards", "--no-progress"])
    return root / "shards"


def _cfg(shards, *extra):
    return load_config("retr_demo", [*FAST, f"data.shards={shards}", *extra])


def _final_weights(run_dir):
    return ckpt.load_state(ckpt.list_states(run_dir / "checkpoints")[-1])["model"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted run: its final weights are what every interrupted-and-resumed run must end with."""
    run_dir = tmp_path_factory.mktemp("reference")
    full = run(_cfg(shards), run_dir=str(run_dir))
    assert full["global_step"] == 6
    assert (run_dir / "config.json").is_file() and (run_dir / "train.log").is_file()
    return _final_weights(run_dir)


def test_kill_and_resume_matches_uninterrupted(shards, reference, tmp_path):
    stopped = run(_cfg(shards), run_dir=str(tmp_path / "cut"), max_steps=4)  # mid-epoch 2
    assert (stopped["ended"], stopped["global_step"]) == ("max_steps", 4)
    states = ckpt.list_states(tmp_path / "cut" / "checkpoints")
    assert [p.name for p in states] == ["state-000000003.pt", "state-000000004.pt"]  # last K=2 kept
    resumed = run(_cfg(shards), run_dir=str(tmp_path / "cut"), resume="auto")
    assert resumed["global_step"] == 6
    _assert_same(reference, _final_weights(tmp_path / "cut"))


def test_resume_is_exact_with_stochastic_depth_and_persistent_workers(shards, tmp_path):
    """drop_path draws from the trainer's RNG: resuming from an epoch's end (state 3) and from the middle of
    an epoch (state 4), with 2 persistent stream workers, both end where the uninterrupted run ends."""
    import shutil

    extra = ["model.drop_path=0.3", "data.num_workers=2"]
    full = run(_cfg(shards, *extra), run_dir=str(tmp_path / "full"))
    assert full["global_step"] == 6
    reference = _final_weights(tmp_path / "full")
    assert run(_cfg(shards, *extra), run_dir=str(tmp_path / "cut"), max_steps=4)["ended"] == "max_steps"
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_at_3")
    for name, step in (("cut", 4), ("cut_at_3", 3)):
        state = ckpt.state_path(tmp_path / name / "checkpoints", step)
        assert ckpt.load_state(state)["step"] == (1 if step == 4 else 0)
        run(_cfg(shards, *extra), run_dir=str(tmp_path / name), resume=str(state))
        _assert_same(reference, _final_weights(tmp_path / name))
    without = run(_cfg(shards, "data.num_workers=2"), run_dir=str(tmp_path / "no_drop_path"))
    assert without["global_step"] == 6
    assert any(not torch.equal(v, reference[k]) for k, v in _final_weights(tmp_path / "no_drop_path").items())


def test_signal_writes_state_and_resume_is_exact(shards, reference, tmp_path):
    """SIGUSR2 in the middle of a step: the state is written at the next step boundary, then exit 128+12."""
    calls = {"n": 0}

    def edit(i, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        return batch

    stopped = run(_cfg(shards), run_dir=str(tmp_path / "sig"), stream_fn=_Edited(edit), num_classes=24)
    assert (stopped["ended"], stopped["signal"], exit_code(stopped)) == ("signal", signal.SIGUSR2, 128 + signal.SIGUSR2)
    assert ckpt.list_states(tmp_path / "sig" / "checkpoints")[-1].name == "state-000000002.pt"
    run(_cfg(shards), run_dir=str(tmp_path / "sig"), resume="auto")
    _assert_same(reference, _final_weights(tmp_path / "sig"))


class _Edited:
    """A stream_fn: the real TrainStream, each micro-batch passed through ``edit(index in its epoch, batch)``."""

    def __init__(self, edit):
        self.edit = edit

    def __call__(self, cfg, rank, world):
        self.stream = TrainStream(cfg, rank, world)
        return self

    def num_steps(self, epoch):
        return self.stream.num_steps(epoch)

    def epoch(self, epoch, start=0):
        for i, batch in enumerate(self.stream.epoch(epoch, start)):
            yield self.edit(i, batch)

    def close(self):
        self.stream.close()


def test_resume_with_changed_config_says_what_changed(shards, tmp_path):
    assert run(_cfg(shards), run_dir=str(tmp_path / "a"), max_steps=2)["ended"] == "max_steps"
    with pytest.raises(ValueError, match=r"config changed.*optim.lr: 0.001 -> 0.002"):
        run(_cfg(shards, "optim.lr=0.002"), run_dir=str(tmp_path / "a"), resume="auto")
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(_cfg(shards), run_dir=str(tmp_path / "a"), resume=str(tmp_path / "nope.pt"))


def test_nan_loss_is_skipped_then_stops(shards, tmp_path, caplog):
    def poisoned(every):
        def edit(i, batch):
            if i % every == 0:  # a float image in place of the stream's pixels
                batch["image"] = torch.full(batch.pop("pixels").shape, float("nan"))
            return batch

        return _Edited(edit)

    result = run(_cfg(shards), run_dir=str(tmp_path / "one"), stream_fn=poisoned(3), num_classes=24)
    assert result["global_step"] == 6
    assert "non-finite loss: 1 step(s) skipped before global step 1 (at most 1 in a row)" in caplog.text
    weights = _final_weights(tmp_path / "one")
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    with pytest.raises(FloatingPointError, match=r"non-finite 2 steps in a row \(loss.max_nan_steps=2\)"):
        run(_cfg(shards, "loss.max_nan_steps=2"), run_dir=str(tmp_path / "all"), stream_fn=poisoned(1), num_classes=24)


def test_bad_batch_composition():
    manifest = {"splits": {"train": {"num_classes": 24}}}
    with pytest.raises(ValueError, match=r"batch_size=20 .* not divisible by 3 process\(es\) x optim.grad_accum=1"):
        check_data(_pk(20, 4), manifest, 3)
    with pytest.raises(ValueError, match=r"24 identities but a batch needs P=32"):
        check_data(_pk(128, 4), manifest, 1)


def _pk(batch, k):
    return load_config("retr_demo", [f"data.batch_size={batch}", f"data.num_instances={k}"])


def test_unknown_loss_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"loss.arcface_weight.*loss.ce_weight.*loss.triplet_weight"):
        load_config("retr_demo", ["loss.arcface_weight=1"])


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_deepspeed_config_files(name, tmp_path):
    """The shipped ZeRO configs; a missing file is named. (Training under them: test_retrieval_distributed.)"""
    import json

    from configs import CONFIG_DIR
    from trainers.setup import make_accelerator

    path = CONFIG_DIR / "deepspeed" / f"{name}.json"
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == int(name[-1])
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=f"train.deepspeed_config='{missing}' does not exist"):
        make_accelerator(load_config("retr_demo", [f"train.deepspeed_config={missing}"]))
    zero3, broken = tmp_path / "zero3.json", tmp_path / "broken.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    broken.write_text("[1, 2")
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported"):
        make_accelerator(load_config("retr_demo", [f"train.deepspeed_config={zero3}"]))
    with pytest.raises(ValueError, match="broken.json' is not a DeepSpeed JSON object"):
        make_accelerator(load_config("retr_demo", [f"train.deepspeed_config={broken}"]))


def test_train_evaluate_tensorboard_and_best_weights(shards, tmp_path):
    """The main job path: eval through inference.evaluate, mAP*.pth (weights only), TB scalars + rank list."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from inference.models import build_model

    cfg = _cfg(shards, "eval.enabled=true", "eval.every=1", "schedule.epochs=1")
    result = run(cfg, run_dir=str(tmp_path / "ev"))
    assert 0.0 <= result["mAP"] <= 1.0 and result["best_mAP"] == result["mAP"]
    best = list((tmp_path / "ev").glob("mAP*.pth"))
    assert [p.name for p in best] == [f"mAP{100 * result['mAP']:.1f}.pth"]
    model = build_model(cfg.model, 24, img_size=(32, 32))
    model.load_state_dict(torch.load(best[0], weights_only=True))
    events = sorted((tmp_path / "ev" / "tb").rglob("events.out.tfevents*"))
    tags = {"scalars": set(), "images": set()}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"images": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    expected = {"train/loss", "train/ce", "train/triplet", "train/center", "train/acc", "train/lr"}
    assert expected | {"train/images_per_s", "eval/mAP", "eval/rank1", "eval/rank5", "eval/mINP"} <= tags["scalars"]
    assert "eval/rank_list" in tags["images"]
    assert "Validation Results - Epoch: 1" in (tmp_path / "ev" / "train.log").read_text()


def test_bf16_channels_last_grad_accum_and_clipping(shards, tmp_path):
    extra = ["train.precision=bf16", "train.channels_last=true", "optim.grad_accum=2", "optim.clip_grad=1.0"]
    result = run(_cfg(shards, *extra, "schedule.epochs=1", "model.head=arcface"), run_dir=str(tmp_path / "bf"))
    assert result["global_step"] == 3
    weights = _final_weights(tmp_path / "bf")
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_cli_stop_then_resume_auto_finds_the_run(shards, tmp_path):
    from trainers.retrieval import main

    args = ["--config", "retr_demo", *FAST, f"data.shards={shards}", f"output_dir={tmp_path}", "schedule.epochs=1"]
    assert main([*args, "--max-steps", "1"]) == 0  # stopped with its state saved: not an error
    (run_dir,) = list((tmp_path / "retr_demo").iterdir())
    assert json.loads((run_dir / "config.json").read_text())["data"]["shards"] == str(shards)
    assert main([*args, "--resume", "auto"]) == 0
    assert list((tmp_path / "retr_demo").iterdir()) == [run_dir]  # continued in the same run directory
    assert ckpt.load_state(ckpt.list_states(run_dir / "checkpoints")[-1])["global_step"] == 3


@pytest.mark.slow
def test_torch_compile_trains_and_saves_plain_weights(shards, tmp_path):
    """train.compile=true (inductor on CPU, about 30 s to compile): state keys are the plain model's."""
    from inference.models import build_model

    cfg = _cfg(shards, "train.compile=true", "schedule.epochs=1")
    assert run(cfg, run_dir=str(tmp_path / "c"))["global_step"] == 3
    weights = _final_weights(tmp_path / "c")
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    build_model(cfg.model, num_classes=24).load_state_dict(weights)  # no "_orig_mod." prefixes


def test_failing_step_exits_promptly_with_stream_workers(shards, tmp_path):
    """An error inside a step (not in the stream) must not leave DataLoader workers, which ignore SIGTERM for
    SLURM's sake, blocking the interpreter's exit."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import REPO

    script = textwrap.dedent(
        f"""
        import sys
        import trainers.retrieval as tr
        calls = []
        step = tr.micro_step
        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure in step 2")
            return step(*args, **kwargs)
        tr.micro_step = failing
        tr.main(["--config", "retr_demo", "--run-dir", {str(tmp_path / "run")!r}, *sys.argv[1:]])
        """
    )
    overrides = [o for o in FAST if not o.startswith("data.num_workers")]
    cmd = [sys.executable, "-c", script, *overrides, "data.num_workers=2", f"data.shards={shards}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "injected failure in step 2" in proc.stderr


def test_sync_bn_converts_every_batchnorm_on_cuda_and_is_refused_with_a_warning_on_cpu(caplog):
    """The conversion itself (running SyncBatchNorm needs CUDA devices: DDP refuses it on CPU)."""
    from types import SimpleNamespace

    from inference.models import build_model
    from trainers.setup import sync_batchnorm

    cfg = load_config("retr_demo", ["model.backbone=test_resnet", "train.sync_bn=true"])
    model = build_model(cfg.model, 8, img_size=(32, 32))
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    gpus = SimpleNamespace(num_processes=2, device=torch.device("cuda", 0))
    synced = sync_batchnorm(model, cfg, gpus)
    assert bns > 2 and sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == bns
    cpus = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    fresh = build_model(cfg.model, 8, img_size=(32, 32))
    with caplog.at_level("WARNING", logger="trainers.retrieval"):
        assert sync_batchnorm(fresh, cfg, cpus) is fresh
    assert "train.sync_bn ignored" in caplog.text
    single = SimpleNamespace(num_processes=1, device=torch.device("cuda", 0))
    assert sync_batchnorm(fresh, cfg, single) is fresh


def test_settings_that_only_change_speed_do_not_block_a_resume():
    from configs import to_dict

    old = to_dict(load_config("retr_demo"))
    speed = ["data.cache_mb=64", "data.num_workers=4", "optim.grad_accum=2", "data.shards_wait_s=5"]
    new = to_dict(load_config("retr_demo", speed))
    assert ckpt.config_changes(old, new) == []
    written_before_the_key = {**old, "data": {k: v for k, v in old["data"].items() if k != "shards_wait_s"}}
    assert ckpt.config_changes(written_before_the_key, new) == []  # a state from before the key existed
    assert ckpt.config_changes(old, to_dict(load_config("retr_demo", ["optim.lr=0.5"]))) == [
        f"optim.lr: {old['optim']['lr']!r} -> 0.5"
    ]
