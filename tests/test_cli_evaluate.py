"""rlvr-eval on the tiny model: the configured model, a run's checkpoints, a reasoning-vocab run, a LoRA adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch as th
from conftest import CACHE_DIR, REPO, cached_config
from hydra.errors import ConfigCompositionException

from rlvr_vocab import evaluation
from rlvr_vocab.cli.evaluate import eval_targets, evaluate
from rlvr_vocab.config import ConfigError
from rlvr_vocab.evaluation import eval_settings

EVAL = ("eval.max_new_tokens=8", "eval.batch_size=8")


@pytest.fixture(scope="module")
def reasoning_run(tmp_path_factory):
    """A 2-step GRPO run of the tiny model with 4 reasoning rows: checkpoint-0, -1, -2 and the final model."""
    from rlvr_vocab.train import train

    out = tmp_path_factory.mktemp("run")
    train(
        cached_config(
            "experiment=debug",
            f"output_dir={out}",
            "model.reasoning_vocab_size=4",
            "model.reasoning.keep_initial_checkpoint=true",
        )
    )
    return out


def test_unknown_eval_key_is_rejected_with_a_suggestion():
    # the typed eval section: Hydra's strict-key error
    with pytest.raises(ConfigCompositionException, match="max_new_token"):
        eval_settings(cached_config("model=tiny", "eval.max_new_token=8"))
    with pytest.raises(ConfigError, match="eval.checkpoints"):
        eval_settings(cached_config("model=tiny", "eval.checkpoints=every"))
    assert eval_settings(cached_config("model=tiny", "training.max_completion_length=33"))["max_new_tokens"] == 33


def test_gsm8k_configured_model_writes_json(gsm8k_dir, tmp_path):
    out = tmp_path / "eval.json"
    cfg = cached_config(
        "model=tiny",
        "dataset=gsm8k",
        f"dataset.path={gsm8k_dir / 'test.jsonl'}",  # the held-out file doubles as the (unused) training file
        f"dataset.eval_path={gsm8k_dir / 'test.jsonl'}",
        "eval.max_samples=4",
        "eval.num_samples=3",
        f"output_file={out}",
        *EVAL,
    )
    report = evaluate(cfg)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    (result,) = saved["results"]
    summary, records = result["summary"], result["records"]
    assert summary["num_problems"] == 4 and len(records) == 4
    for key in ("pass@1", "pass@3", "maj@3", "mean@3", "format_rate", "mean_length"):
        assert 0.0 <= summary[key] <= (8 if key == "mean_length" else 1.0), key
    assert records[0]["answer"] == "18"  # GSM8K test row 0, gold after '####'
    assert all(len(r["samples"]) == 3 and 1 <= r["num_tokens"] <= 8 for r in records)


def test_correct_answers_score_one(tmp_path):
    """The scorer is the accuracy reward: a gold \\boxed{} answer is right, another number is not."""
    cfg = cached_config("model=tiny", "dataset=arithmetic")
    reward = evaluation.correctness_reward(cfg)
    assert evaluation._score(reward, ["so \\boxed{1,000}", "\\boxed{7}", "no box: 12"], ["1000", "8", "12"]) == [
        True,
        False,
        False,  # the accuracy reward grades the \boxed{} answer; a bare final number does not count
    ]
    last_number = evaluation.correctness_reward(cfg, "last_number")  # eval.reward=last_number
    assert evaluation._score(last_number, ["no box: 12", "\\boxed{7}"], ["12", "8"]) == [True, False]
    with pytest.raises(ConfigError, match="eval.reward='acc'"):
        evaluation.correctness_reward(cfg, "acc")


def test_a_box_with_a_space_counts_for_rewards_and_the_format_rate():
    """``\\boxed {7}`` (a space before the brace): one last_boxed, so the rewards that read it (last_number,
    boxed_format), the held-out format_rate, the extracted answer and a boxed gold agree that it is the answer 7.
    (The accuracy reward grades as TRL does, through math-verify's own extraction.)"""
    from rlvr_vocab.data import extract_gold
    from rlvr_vocab.generation import Completion
    from rlvr_vocab.rewards.format import boxed_format_reward

    text = "so the answer is \\boxed {7}."
    reward = evaluation.correctness_reward(cached_config("model=tiny", "dataset=arithmetic"), "last_number")
    assert evaluation._score(reward, [text, text.replace("7", "8")], ["7", "7"]) == [True, False]
    assert boxed_format_reward([text]) == [1.0]
    record = evaluation._record(Completion(text=text, num_tokens=9, truncated=False, answer=text))
    assert record["boxed"] == record["extracted"] == "7"
    assert evaluation.summarize([{**record, "correct": True, "truncated": False}], 1)["format_rate"] == 1.0
    assert extract_gold(text, "boxed") == "7"


def test_run_folder_evaluates_every_checkpoint_and_plots(reasoning_run, tmp_path):
    out = tmp_path / "run_eval.json"
    cfg = cached_config(
        "experiment=debug", f"eval.model_path={reasoning_run}", "eval.num_samples=2", f"output_file={out}", *EVAL
    )
    report = evaluate(cfg)
    assert [r["step"] for r in report["results"]] == [0, 1, 2]  # the final model is checkpoint-2: not twice
    assert (tmp_path / "run_eval.md").read_text().count("| checkpoint-") == 3
    assert (tmp_path / "run_eval.png").read_bytes()[:4] == b"\x89PNG"
    assert all(r["summary"]["num_problems"] == 8 for r in report["results"])


def test_reasoning_checkpoint_restores_rows_and_mask(reasoning_run):
    from rlvr_vocab.generation import generate, load_policy

    cfg = cached_config("experiment=debug")
    model, tok = load_policy(cfg, reasoning_run / "checkpoint-1")
    vocab = model.reasoning_vocab
    assert vocab is not None and model.get_input_embeddings().weight.size(0) == vocab.standard_size + 4
    with th.no_grad():
        model.get_output_embeddings().weight[vocab.standard_size :] *= 50  # make reasoning ids tempting
    outside = tok(["1+1=", "2+2="], return_tensors="pt").to(model.device)
    ids = model.generate(**outside, max_new_tokens=6, do_sample=True, num_return_sequences=4)
    start = outside.input_ids.size(1)
    inside_before = vocab.span_state(ids)[:, start - 1 : -1]  # may token t be a reasoning id (a <think> opens)
    generated = ids[:, start:]
    assert not ((generated >= vocab.standard_size) & ~inside_before).any(), "reasoning id outside <think>"
    # inside the span they are sampled, and the completions read them as their source tokens
    inside = generate(model, tok, ["<think>"], max_new_tokens=6, num_samples=4, do_sample=True, progress=False)
    assert all(c.text and c.num_tokens <= 6 for c in inside[0])


def test_targets(reasoning_run):
    ckpt = str(reasoning_run / "checkpoint-1")
    assert eval_targets(ckpt, "auto") == [(ckpt, 1)]
    assert [s for _, s in eval_targets(ckpt, "all")] == [0, 1, 2]
    assert eval_targets(str(reasoning_run), "one") == [(str(reasoning_run), 2)]
    assert eval_targets(None, "auto") == [(None, None)]
    with pytest.raises(ConfigError, match="eval.checkpoints=all"):
        eval_targets(None, "all")


def test_lora_adapter_folder_loads_base_plus_adapter(tmp_path):
    """An adapter folder (with reasoning rows trained as trainable tokens) gives the adapted model's logits."""
    from rlvr_vocab.generation import load_policy
    from rlvr_vocab.models import load_model_and_tokenizer
    from rlvr_vocab.peft_utils import apply_lora
    from rlvr_vocab.reasoning_vocab import extend_model

    overrides = ("model=tiny", "model.reasoning_vocab_size=4", "model.lora.enabled=true", "model.lora.r=4")
    cfg = cached_config(*overrides)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.paths.cache_dir, bf16=False, seed=cfg.seed)
    vocab = extend_model(model, tok, 4, cfg.model.reasoning)
    peft_model = apply_lora(model, cfg.model.lora, 4)
    with th.no_grad():  # stand-in for training: move every adapter weight, reasoning rows included
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(th.randn_like(p) * 0.5)
    adapter = tmp_path / "checkpoint-3"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    vocab.save(adapter)
    peft_model.eval()
    ids = th.tensor([tok("<think>1+1=").input_ids])
    with th.no_grad():
        expected = peft_model(input_ids=ids).logits

    loaded, loaded_tok = load_policy(cached_config(*overrides), adapter)
    assert loaded.reasoning_vocab.standard_size == vocab.standard_size
    with th.no_grad():
        got = loaded(input_ids=ids).logits
    th.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cli_runs_and_reports_config_errors(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "cli.json"
    common = [sys.executable, "-m", "rlvr_vocab.cli.evaluate", "experiment=debug", f"paths.cache_dir={CACHE_DIR}"]
    ok = subprocess.run(
        [*common, "eval.max_samples=2", *EVAL, f"output_file={out}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(out.read_text())["results"][0]["summary"]["num_problems"] == 2
    assert "| pass@1 |" in ok.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.json"], "the tool left Hydra files behind"
    bad = subprocess.run([*common, "eval.split=dev"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "eval.split" in bad.stderr
    assert str(REPO)  # the tool finds conf/ from any working directory


def test_answered_rate_counts_a_closed_span_with_a_number_or_box_after_it():
    """``heldout/closed_answered_rate``: the span closed and an answer (a box or a bare number) after it; a closed
    span followed only by tags, or an open span with a number, is no answer. (The closed_boxed rate counts only
    boxes, which a last_number experiment's answers seldom are.)"""
    base = {"correct": False, "truncated": False, "num_tokens": 5, "think_tokens": 2}
    records = [
        {**base, "closed_span": True, "boxed": None, "extracted": "58"},  # a bare number after the span
        {**base, "closed_span": True, "boxed": "7", "extracted": "7"},  # a box
        {**base, "closed_span": True, "boxed": None, "extracted": None},  # only close tags after it
        {**base, "closed_span": False, "boxed": None, "extracted": "3"},  # never closed
    ]
    summary = evaluation.summarize(records, 1)
    assert summary["closed_answered_rate"] == 0.5
    assert summary["closed_boxed_rate"] == 0.25
    assert summary["closed_rate"] == 0.75
