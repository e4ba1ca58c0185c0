"""Training presets (conf/training/{quick,medium,full,gpu,cpu,debug}): values, composition with every experiment."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, compose_config
from omegaconf import OmegaConf

from rlvr_vocab.config import validate

PRESETS = ("quick", "medium", "full", "gpu", "cpu", "debug")
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
# (max_steps, dataset.max_train_samples) as the issue defines them
LENGTHS = {"quick": (10, 100), "medium": (50, 1000), "full": (200, None), "debug": (2, 16)}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates(preset):
    cfg = compose_config(f"training={preset}")
    validate(cfg)
    if preset in LENGTHS:
        assert (cfg.training.max_steps, cfg.dataset.max_train_samples) == LENGTHS[preset]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_every_experiment(preset, experiment):
    cfg = compose_config(f"training={preset}", f"experiment={experiment}")
    validate(cfg)
    assert cfg.training.save_steps >= 1


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_under_debug_overlay(preset):
    validate(compose_config(f"training={preset}", "debug=default"))


def test_presets_start_from_default_and_change_only_their_keys():
    default = compose_config().training
    quick = compose_config("training=quick").training
    assert quick.per_device_train_batch_size == default.per_device_train_batch_size
    assert quick.max_completion_length == default.max_completion_length
    assert compose_config("training=gpu").training.bf16 is True
    assert compose_config("training=cpu").training.bf16 is False
    # experiment=quickstart picks training=cpu and keeps its own steps
    cfg = compose_config("experiment=quickstart")
    own_steps = OmegaConf.load(REPO / "conf" / "experiment" / "quickstart.yaml").training.max_steps
    assert cfg.training.lr_scheduler_type == "constant" and cfg.training.max_steps == own_steps


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_key_is_commented(preset):
    for n, line in enumerate((REPO / "conf" / "training" / f"{preset}.yaml").read_text().splitlines(), start=1):
        if re.match(r"^\s*[A-Za-z_][\w]*:\s*\S", line):  # a key with a value
            assert "#" in line, f"{preset}.yaml line {n} has no comment: {line!r}"


def test_debug_preset_trains_the_tiny_model(make_cfg):
    from rlvr_vocab.train import train

    cfg = make_cfg(
        "model=tiny",
        "dataset=arithmetic",
        "training=debug",
        "dataset.generator.num_train=32",
        "dataset.generator.num_eval=8",
    )
    assert train(cfg)["global_step"] == 2
