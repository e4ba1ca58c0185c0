"""Bad input is refused before any model or data is loaded, with an error naming the problem and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from rlvr_vocab.config import ConfigError
from rlvr_vocab.preflight import check_model_available
from rlvr_vocab.train import train


def test_uncached_hub_model_offline_names_the_id_and_offline_mode(make_cfg, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cfg = make_cfg("experiment=debug", "model=qwen3_0.6b", "model.name_or_path=nobody/no-such-model")
    with pytest.raises(
        ConfigError, match=r"model.name_or_path='nobody/no-such-model' is not in the .*HF_HUB_OFFLINE=1"
    ):
        train(cfg)
    assert not Path(cfg.output_dir).exists()  # refused before anything was written


def test_a_local_model_path_that_does_not_exist_is_named(make_cfg, tmp_path):
    cfg = make_cfg("model=qwen3_0.6b", f"model.name_or_path={tmp_path / 'no-model'}")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_model_available(cfg.model)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.max_train_samples=0", "dataset.max_train_samples=0"),
        ("reward.funcs=[nonexistent]", r"reward.funcs: unknown reward\(s\) \['nonexistent'\]; valid names"),
        ("training.learning_rate=-1", "training.learning_rate"),
        # the checks that need TRL or torch run in train(), after validate(): a GRPOConfig field, QLoRA
        ("+training.extra.top_entropy_quantil=0.5", "training.extra.top_entropy_quantil.*top_entropy_quantile"),
        ("model.lora.load_in_4bit=true", "model.lora.load_in_4bit=true needs model.lora.enabled=true"),
    ],
)
def test_train_refuses_before_writing_anything(make_cfg, override, message):
    cfg = make_cfg("experiment=debug", override)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not Path(cfg.output_dir).exists()


def test_an_empty_training_file_is_a_config_error_with_exit_code_2(tmp_path):
    """As a user runs it: rc 2 and one line naming the key and the file, no traceback, no run folder."""
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "grpo_train.py", "experiment=debug", "dataset=gsm8k", f"dataset.path={empty}",
         f"hydra.run.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"dataset.path='{empty}' is empty (0 bytes)" in proc.stderr
    assert "Traceback" not in proc.stderr and "StopIteration" not in proc.stderr
    assert not run.exists()  # the folder Hydra made for the refused start is gone again
