import json

import pytest

import configs
from configs import ExperimentConfig, config_kind, list_configs, load_config, save_config


@pytest.mark.parametrize("name", [n for n in list_configs() if config_kind(n) == "dataclass"])
def test_every_dataclass_config_builds(name, tmp_path):
    cfg = load_config(name)
    assert isinstance(cfg, ExperimentConfig)
    path = save_config(cfg, tmp_path / "config.json")
    again = configs.from_dict(json.loads(path.read_text()))
    assert again == cfg


def test_overrides_are_typed():
    cfg = load_config(
        "retr_demo",
        [
            "optim.lr=3e-4",
            "--data.height",
            "96",
            "schedule.milestones=5,8",
            "train.compile=true",
            "--data.augment.mean=0.5,0.5,0.5",
        ],
    )
    assert cfg.optim.lr == 3e-4 and cfg.data.height == 96 and cfg.schedule.milestones == (5, 8)
    assert cfg.train.compile is True and cfg.data.augment.mean == (0.5, 0.5, 0.5)


def test_unknown_key_names_key_and_lists_valid():
    with pytest.raises(ValueError, match=r"optim.lrr.*valid keys here: .*optim.lr"):
        load_config("retr_demo", ["optim.lrr=1"])


def test_bad_type_names_key():
    with pytest.raises(ValueError, match=r"data.height.*integer"):
        load_config("retr_demo", ["data.height=tall"])


def test_bad_choice_is_revalidated():
    with pytest.raises(ValueError, match=r"data.sampler='nope'"):
        load_config("retr_demo", ["data.sampler=nope"])


def test_pk_batch_must_divide():
    with pytest.raises(ValueError, match="multiple of data.num_instances"):
        load_config("retr_demo", ["data.batch_size=30"])


def test_unknown_config_lists_available():
    with pytest.raises(ValueError, match="available configs: .*retr_demo"):
        load_config("nope")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule.warmup_factor=-1", r"schedule.warmup_factor=-1.0 must be in \(0, 1\]"),
        ("optim.lr=nan", r"optim.lr=nan must be a finite number"),
        ("optim.lr=inf", r"optim.lr=inf must be a finite number"),
        ("optim.weight_decay=nan", r"optim.weight_decay=nan must be a finite number"),
        ("schedule.gamma=nan", r"schedule.gamma=nan must be a finite number"),
        ("data.height=100000", r"data.height=100000 must be in \[16, 4096\]"),
        ("data.prepare.padding=nan", r"data.prepare.padding=nan must be a finite number"),
        ("data.prepare.padding=-0.1", r"data.prepare.padding=-0.1 must be in \[0, 4\]"),
        ("data.augment.mean=0.5,nan,0.5", r"data.augment.mean=\(0.5, nan, 0.5\) must be a finite number"),
        ("train.seed=99999999999999999999", r"train.seed=.* does not fit a 64-bit integer"),
        ("optim.lr=0", r"optim.lr=0.0 must be in \(0, 100\]"),
    ],
)
def test_harmful_numbers_are_rejected_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("retr_demo", [override])


def test_every_numeric_field_has_a_declared_range():
    """A new numeric field must be given a range in configs/_ranges.py when it is added."""
    import dataclasses
    import typing

    from configs._ranges import RANGES

    def numeric_keys(cls, prefix):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hint):
                yield from numeric_keys(hint, key + ".")
            elif hint in (int, float) or (
                typing.get_origin(hint) is tuple and typing.get_args(hint)[0] in (int, float)
            ):
                yield key

    missing = [k for k in numeric_keys(ExperimentConfig, "") if k not in RANGES]
    assert not missing, f"add a range for {missing} to configs/_ranges.py RANGES"
    unknown = set(RANGES) - set(numeric_keys(ExperimentConfig, ""))
    assert not unknown, f"RANGES lists keys that are not numeric config fields: {sorted(unknown)}"


def test_sections_built_directly_are_range_checked():
    from configs import OptimConfig, PrepareConfig

    with pytest.raises(ValueError, match=r"data.prepare.padding=nan"):
        PrepareConfig(padding=float("nan"))
    with pytest.raises(ValueError, match=r"optim.weight_decay=2.0 must be in \[0, 1\]"):
        OptimConfig(weight_decay=2.0)


def test_a_section_added_to_the_tree_is_range_checked_by_its_dotted_key():
    import dataclasses

    from configs._ranges import check_tree

    @dataclasses.dataclass
    class Extra:
        alpha: float = 0.5

    @dataclasses.dataclass
    class Tree:
        extra: Extra = dataclasses.field(default_factory=Extra)

    check_tree(Tree())
    with pytest.raises(ValueError, match=r"extra.alpha=nan must be a finite number"):
        check_tree(Tree(Extra(float("nan"))))


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.lr=1e-6", "optim.weight_decay=0.05", "optim.name=adamw", "optim.clip_grad=5.0"],
        ["data.batch_size=4096", "data.num_instances=8", "optim.grad_accum=8", "launch.nodes=8"],
        ["data.height=384", "data.width=384", "model.drop_path=0.3", "model.embed_dim=2048"],
        ["data.height=384", "data.width=128", "data.prepare.padding=0.1", "data.prepare.max_side=0"],
        ["model.head=arcface", "model.scale=64", "model.margin=0.5", "loss.center_weight=0.0005"],
        ["schedule.kind=cosine", "schedule.warmup_epochs=0", "schedule.epochs=300", "train.seed=4294967296"],
        ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.99", "schedule.milestones=(30,60,90)"],
    ],
)
def test_real_world_values_are_accepted(overrides):
    """The ranges refuse harm, not real recipes (large batches, tiny lr, 384-pixel inputs, ArcFace, ...)."""
    load_config("retr_swinb", overrides)
    load_config("reid_r50", overrides)
