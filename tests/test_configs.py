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
