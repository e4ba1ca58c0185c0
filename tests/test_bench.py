"""The benchmark's pieces: the tokenizer, the table, a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_grpo  # noqa: E402


def test_bench_tokenizer_covers_every_model_row():
    tok = bench_grpo.build_tokenizer(1000)
    assert len(tok) == 1000 and tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("t5 t17 <think>").input_ids
    assert ids[:2] == [5, 17] and tok.convert_ids_to_tokens(ids[2]) == "<think>"


def test_table_and_summary():
    raw = {
        "variant": "fast-512",
        "label": "ours",
        "step_times_s": [40.0, 2.0, 3.0],
        "generation_times_s": [39.0, 1.5, 1.5],
        "completion_tokens_per_step": [16384, 16384, 16384],
        "peak_allocated_gib": 27.0,
        "fast_path_used": True,
    }
    row = bench_grpo.summarise(raw, warmup=1)
    assert row["s_per_step"] == 2.5 and row["completion_tokens_per_s"] == 16384 / 2.5
    text = bench_grpo.table([row, {"variant": "x", "label": "y", "error": "OOM"}])
    assert row["s_per_step_median"] == 2.5
    assert "| fast-512 | ours | 2.50 | 2.50 | 1.50 | 6,554 | 27.0 |" in text and "OOM" in text


@pytest.mark.slow
def test_tiny_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "bench_grpo.py"),
        "--tiny",
        "--variants",
        "fast-512-rv",
        "--steps",
        "1",
    ]
    subprocess.run(cmd + ["--out", str(out)], check=True, cwd=REPO, timeout=900)
    summary = json.loads(out.read_text())["summary"][0]
    assert summary["fast_path_used"] and summary["completion_tokens"] == 32 * 16
