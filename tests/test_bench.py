"""The benchmark's pieces: the fused masked head equals the trainer's, the tokenizer, the table, a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_grpo  # noqa: E402
import masked_head  # noqa: E402

from rlvr_vocab.trainer import masked_token_logprobs  # noqa: E402


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_masked_head_equals_the_trainer_head(temperature):
    g = torch.Generator().manual_seed(0)
    v, n, d, t = 50, 20, 16, 61
    hidden = torch.randn(t, d, generator=g, requires_grad=True)
    head = torch.nn.Linear(d, v + n, bias=True)
    weight = head.weight
    inside = torch.rand(t, generator=g) > 0.4
    labels = torch.where(inside, torch.randint(0, v + n, (t,), generator=g), torch.randint(0, v, (t,), generator=g))
    ref, ref_ent = masked_token_logprobs(hidden, head, labels, inside, v, temperature, 16, entropy=True)
    ours, ent = masked_head.masked_token_logprobs(hidden, head, labels, inside, v, temperature, entropy=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-4)
    g1 = torch.autograd.grad(ours.sum(), (hidden, weight, head.bias))
    g2 = torch.autograd.grad(ref.sum(), (hidden, weight, head.bias))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_masked_head_edge_cases():
    hidden = torch.randn(4, 8)
    head = torch.nn.Linear(8, 12, bias=False)
    labels = torch.tensor([1, 11, 2, 3])
    all_in, _ = masked_head.masked_token_logprobs(hidden, head, labels, torch.ones(4, dtype=torch.bool), 10)
    all_out, _ = masked_head.masked_token_logprobs(hidden, head, labels, torch.zeros(4, dtype=torch.bool), 10)
    assert torch.isfinite(all_in).all()
    assert torch.isinf(all_out[1]) and torch.isfinite(all_out[[0, 2, 3]]).all()


def test_fused_masked_head_defers_to_the_trainer_for_wrapped_heads():
    head = torch.nn.Sequential(torch.nn.Linear(8, 12))  # stands for a PEFT wrapper around the head
    hidden, labels, inside = torch.randn(5, 8), torch.tensor([0, 1, 10, 2, 11]), torch.ones(5, dtype=torch.bool)
    ours, _ = masked_head.masked_token_logprobs(hidden, head, labels, inside, 10)
    ref, _ = masked_token_logprobs(hidden, head, labels, inside, 10)
    torch.testing.assert_close(ours, ref)


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
