"""End-to-end GRPO on the tiny model: parameters change, outputs are written, the map is in every checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch as th
from conftest import cached_config, digit_share
from safetensors.torch import load_file

from rlvr_vocab.models import load_model_and_tokenizer
from rlvr_vocab.rewards.registry import REWARD_REGISTRY
from rlvr_vocab.train import train


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    monkeypatch.setitem(REWARD_REGISTRY, "digit_share", digit_share)


TINY_RUN = [
    "experiment=debug",
    "reward.funcs=[digit_share]",
    "reward.weights=[1.0]",
    "training.max_steps=3",
    "training.save_steps=1",
    "training.max_completion_length=12",
    "training.learning_rate=5e-3",
]


def initial_state(cfg):
    model, _ = load_model_and_tokenizer(cfg.model, cfg.paths.cache_dir, bf16=False, seed=cfg.seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_grpo_end_to_end_changes_parameters_and_writes_outputs(make_cfg):
    cfg = make_cfg(*TINY_RUN)
    before = initial_state(cfg)
    metrics = train(cfg)
    out = Path(cfg.output_dir)
    assert metrics["global_step"] == 3
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "tokenizer.json", "config.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    after = load_file(out / "model.safetensors")
    changed = [k for k in after if k in before and not th.equal(after[k], before[k])]
    assert changed, "no parameter changed during GRPO"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in logged if "reward" in r]
    assert len(rewards) == 3 and any(r > 0 for r in rewards)
    assert "learning_rate: 0.005" in (out / "config.yaml").read_text()


def test_reasoning_run_saves_the_map_in_every_checkpoint_and_keeps_checkpoint_0(make_cfg):
    cfg = make_cfg(
        *TINY_RUN,
        "model.reasoning_vocab_size=24",
        "model.reasoning.keep_initial_checkpoint=true",
        "training.save_total_limit=1",
        "dataset.system_prompt='Think inside <think> </think>, then answer.'",
    )
    metrics = train(cfg)
    out = Path(cfg.output_dir)
    assert metrics["global_step"] == 3
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-0", "checkpoint-3"]  # rotation kept the untrained baseline
    for folder in [out / c for c in checkpoints] + [out]:
        vocab = json.loads((folder / "reasoning_vocab.json").read_text())
        assert vocab["size"] == 24 and len(vocab["source_ids"]) == 24
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reasoning/token_fraction" in r for r in logged if "reward" in r)

    from rlvr_vocab import load_checkpoint

    model, tok = load_checkpoint(out)
    assert model.get_input_embeddings().weight.shape[0] == vocab["standard_size"] + 24

    # rlvr-viz: usage, drift and a rendered sample from the run dir
    from rlvr_vocab.cli.viz import drift, visualize
    from rlvr_vocab.reasoning_vocab import ReasoningVocab

    written = visualize(out, max_new_tokens=16, open_span=True)
    assert sorted(p.name for p in written) == ["drift.png", "sample.png", "usage.png"]
    assert all(p.stat().st_size > 5000 for p in written)
    assert (out / "viz" / "sample.txt").read_text().startswith("<think>")
    rv = ReasoningVocab.load(out)
    initial = drift(out / "checkpoint-0", rv)["embedding"]
    th.testing.assert_close(initial, th.ones_like(initial))  # untrained rows are exact copies
    summary = json.loads((out / "viz" / "drift.json").read_text())
    assert [row["step"] for row in summary["embedding"]] == [0, 3]
    assert summary["embedding"][0]["mean"] == pytest.approx(1.0) and summary["embedding"][0]["min"] == pytest.approx(
        1.0
    )
    final = drift(out / "checkpoint-3", rv)["embedding"]
    assert summary["embedding"][1]["mean"] == pytest.approx(float(final.mean()))


def test_wandb_offline_run_logs_config_and_metrics(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a secret that must not land in saved configs
    cfg = make_cfg(*TINY_RUN, "logging=wandb", "logging.mode=offline", "training.max_steps=1", "exp_name=wb")
    train(cfg)
    out = Path(cfg.output_dir)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_files = list(runs[0].rglob("*"))
    assert any(p.suffix == ".wandb" for p in run_files)
    saved = (out / "config.yaml").read_text()
    assert "x" * 40 not in saved
    for p in run_files:
        if p.is_file() and p.stat().st_size < 5_000_000:
            assert b"x" * 40 not in p.read_bytes(), p


HELD_OUT = ["eval.every_steps=2", "eval.max_samples=6", "eval.reward=last_number", "eval.batch_size=4"]


def test_held_out_eval_during_training_logs_a_curve_and_leaves_training_unchanged(tmp_path):
    """eval.every_steps: held-out records at steps 0, 2 and the end, equal to rlvr-eval of the final model,
    and the run's weights identical to the same run without it (the eval does not consume training randomness)."""
    from rlvr_vocab.cli.evaluate import evaluate

    def run(name: str, *extra: str):
        cfg = cached_config(f"output_dir={tmp_path / name}", *TINY_RUN, *extra)
        train(cfg)
        return cfg, Path(cfg.output_dir)

    cfg, with_eval = run("with_eval", *HELD_OUT)
    _, without = run("without")
    logged = [json.loads(line) for line in (with_eval / "metrics.jsonl").read_text().splitlines()]
    heldout = [r for r in logged if "heldout/pass@1" in r]
    assert [r["step"] for r in heldout] == [0, 2, 3]
    for r in heldout:
        assert 0.0 <= r["heldout/pass@1"] <= 1.0 and r["heldout/mean_length"] > 0 and r["heldout/seconds"] > 0
    assert [r["heldout/train_seconds"] for r in heldout] == sorted(r["heldout/train_seconds"] for r in heldout)
    assert len([r for r in logged if "reward" in r]) == 3  # training metrics still logged once per step
    assert all("time" in r for r in logged)

    final = evaluate(cached_config(*TINY_RUN, *HELD_OUT, f"eval.model_path={with_eval}", "eval.checkpoints=one",
                                   f"output_file={tmp_path / 'eval.json'}"))  # fmt: skip
    summary = final["results"][0]["summary"]
    assert summary["pass@1"] == heldout[-1]["heldout/pass@1"]
    assert summary["mean_length"] == heldout[-1]["heldout/mean_length"]

    from bench import learning_curve

    assert learning_curve.main([str(with_eval), "--target", "0.0", "--json", str(tmp_path / "curve.json")]) == 0
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [row["step"] for row in curve["rows"]] == [0, 2, 3]
    window = [r["reward"] for r in logged if "reward" in r and r["step"] in (1, 2)]
    assert curve["rows"][1]["train_reward"] == pytest.approx(sum(window) / 2, abs=1e-3)
    assert curve["reached"]["step"] == 0
    with pytest.raises(ValueError, match="eval.every_steps"):
        learning_curve.read_curve(without)

    a, b = load_file(with_eval / "model.safetensors"), load_file(without / "model.safetensors")
    assert a.keys() == b.keys() and all(th.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_non_finite_gradient_stops_training_before_the_weights_change(tmp_path, accumulation):
    """One NaN gradient must not reach the weights: the run stops at that step, naming it and the parameter."""
    from conftest import make_trainer, tiny_llama

    from rlvr_vocab.models import build_tiny_tokenizer
    from rlvr_vocab.trainer import NonFiniteGradientError

    tok = build_tiny_tokenizer()
    model = tiny_llama(tok, seed=1)
    trainer = make_trainer(
        model, tok, None, tmp_path, max_steps=3, save_steps=1, learning_rate=1e-2,
        gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    poisoned = model.model.layers[0].mlp.up_proj.weight
    poisoned.register_hook(lambda grad: grad * float("nan") if trainer.state.global_step == 1 else grad)
    with pytest.raises(
        NonFiniteGradientError,
        match=rf"step 2: non-finite gradients, first seen in micro-batch {accumulation} .*: 1 of \d+ gradients non-finite \(model\.layers\.0\.mlp\.up_proj\.weight\)",
    ):
        trainer.train()
    assert trainer.state.global_step == 1  # step 1 was taken; step 2 was refused before optimizer.step
    assert all(th.isfinite(p).all() for p in model.parameters())
    assert sorted(p.name for p in (tmp_path / "t").glob("checkpoint-*")) == ["checkpoint-1"]


@pytest.mark.parametrize(
    "setting, completion, cudnn", [(None, 24, False), (None, 1024, True), (False, 1024, False), (True, 24, True)]
)
def test_cudnn_attention_follows_the_setting_in_training_and_rollouts(tmp_path, setting, completion, cudnn):
    """training.cudnn_attention: SDPA's cuDNN backend (JIT compiles per length class on Hopper: the slow steps of
    BENCHMARKS.md) is on or off in every attention call of train(), generation and training alike (null: on from
    1,024-token completions); the process's own setting comes back after it."""
    from conftest import make_trainer, tiny_llama

    from rlvr_vocab.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = tiny_llama(tok, seed=1)
    trainer = make_trainer(
        model, tok, None, tmp_path, max_steps=1, save_strategy="no", cudnn_attention=setting,
        max_completion_length=completion,
    )  # fmt: skip
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda *_: seen.append((th.is_grad_enabled(), th.backends.cuda.cudnn_sdp_enabled()))
    )
    before = th.backends.cuda.cudnn_sdp_enabled()
    trainer.train()
    assert {grad for grad, _ in seen} == {True, False}, "both rollouts (no grad) and training forwards were seen"
    assert {flag for _, flag in seen} == {cudnn}
    assert th.backends.cuda.cudnn_sdp_enabled() == before


def test_console_shows_a_banner_one_line_per_step_and_a_summary_and_train_log_holds_them(tmp_path, capfd):
    """What a researcher reads (issue 15): no transformers metrics dicts, bars or held-out dicts; the same lines
    in the run dir's train.log. One 2-step debug run with a held-out eval at every step, in a folder named as a
    sweep point's (braces: loguru must not read the path as a template)."""
    import re
    import sys
    import warnings

    from loguru import logger

    run_dir = tmp_path / "0_+reward.kwargs.x={a:1},seed=1"
    cfg = cached_config(f"output_dir='{run_dir}'", "experiment=debug", "eval.every_steps=1", "eval.max_samples=4",
                        "eval.batch_size=4")  # fmt: skip
    assert Path(cfg.output_dir) == run_dir
    console_sink = logger.add(sys.stderr, level="INFO")  # loguru's own console handler holds the stderr of import
    try:  # time, which capfd does not read: this one writes where transformers' prints and bars go
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # what a user's console shows, not pytest's filters
            train(cfg)
    finally:
        logger.remove(console_sink)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    out = Path(cfg.output_dir)
    captured = capfd.readouterr()
    console = captured.out + captured.err

    assert console.count("GRPO run debug") == 1
    banner = "\n".join(console[console.index("GRPO run debug") :].splitlines()[:7])  # one block
    for expected in ("tiny-qwen3", "no reasoning rows", "32 train rows", "8 held-out rows", "1 x accuracy",
                     "max_steps 2", "2 prompts x 2 completions", "max 8 completion tokens", f"output   {out}\n",
                     "tracker  none"):  # fmt: skip
        assert expected in banner, expected

    step_lines = [line for line in console.splitlines() if re.search(r"step \d+/2 \| reward", line)]
    assert [int(re.search(r"step (\d+)/2", line).group(1)) for line in step_lines] == [1, 2]
    for line in step_lines:
        for field in ("reward 0.", " ± ", "| accuracy ", "| len ", " clipped ", "| lr 1.0e-03", " s/step ETA "):
            assert field in line, (field, line)
    heldout_lines = [line for line in console.splitlines() if "held-out step " in line]
    assert [re.search(r"held-out step (\d+):", line).group(1) for line in heldout_lines] == ["0", "1", "2"]
    assert "Finished: step 2/2" in console and "held-out pass@1" in console.split("Finished: ")[1]
    for noise in ("{'loss'", "{'heldout", "{'train_runtime'", "Writing model shards", "it/s]"):
        assert noise not in console, noise

    log = (out / "train.log").read_text()
    assert "GRPO run debug" in log and "  model    tiny-qwen3" in log
    for line in step_lines + heldout_lines:
        assert line.split(" - ", 1)[1] in log
    assert "Finished: step 2/2" in log
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in logged if "reward" in r]) == 2 and "total_flos" in logged[-1]  # the file keeps it all


def test_a_failed_run_leaves_its_traceback_in_train_log(make_cfg, monkeypatch):
    def broken_reward(completions, **kwargs):
        raise RuntimeError("reward server is down")

    monkeypatch.setitem(REWARD_REGISTRY, "broken_reward", broken_reward)
    cfg = make_cfg("experiment=debug", "reward.funcs=[broken_reward]", "reward.weights=[1.0]")
    with pytest.raises(RuntimeError, match="reward server is down"):
        train(cfg)
    log = (Path(cfg.output_dir) / "train.log").read_text()
    assert "GRPO run debug" in log
    assert "Training failed:" in log and "RuntimeError: reward server is down" in log


def test_a_run_whose_groups_all_tie_warns_that_it_learns_nothing(make_cfg, monkeypatch, tmp_path):
    """A constant reward (every completion of every group scores the same): after logging.stall_warn_steps logged
    steps the run says loudly that the advantages are 0 and names the key; once, not every step. With real rewards
    (digit_share, spread in each group) the same run does not warn."""
    from loguru import logger

    monkeypatch.setitem(REWARD_REGISTRY, "constant", lambda completions, **kw: [0.2] * len(completions))
    for funcs, expect in (("[constant]", 1), ("[digit_share]", 0)):
        captured: list[str] = []
        handle = logger.add(captured.append, level="WARNING")  # loguru's messages are str
        try:
            cfg = make_cfg(*TINY_RUN, f"reward.funcs={funcs}", "logging.stall_warn_steps=2", "training.save_steps=10")
            cfg.output_dir = str(tmp_path / funcs.strip("[]"))
            assert train(cfg)["global_step"] == 3
        finally:
            logger.remove(handle)
        stalls = [m for m in captured if "got the same reward" in m]
        assert len(stalls) == expect, captured
        if expect:
            assert "logging.stall_warn_steps=2" in stalls[0] and "reward 0.200" in stalls[0]


def test_stall_warning_resets_when_the_spread_returns():
    from types import SimpleNamespace

    from loguru import logger

    from rlvr_vocab.logging_utils import StalledRewardCallback

    captured: list[str] = []
    handle = logger.add(lambda m: captured.append(str(m)), level="WARNING")
    callback = StalledRewardCallback(steps=2)
    try:
        for step, zero_std in enumerate([1.0, 0.5, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0], 1):
            state = SimpleNamespace(global_step=step, is_world_process_zero=True)
            callback.on_log(None, state, None, logs={"frac_reward_zero_std": zero_std, "reward": 0.2})
    finally:
        logger.remove(handle)
    assert [m.split("step ")[1].split(":")[0] for m in captured] == ["4", "8"]  # two stalls, one warning each
