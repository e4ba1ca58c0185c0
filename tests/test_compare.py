"""rlvr-compare: statistics with known answers on synthetic runs, refusals, and a real mini sweep feeding it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CACHE_DIR, REPO

from rlvr_vocab.cli.compare import main as compare_main
from rlvr_vocab.comparison import CompareError, compare, compare_values, find_runs, group_runs

BASE_CONFIG = {
    "exp_name": "x",
    "seed": 1,
    "output_dir": "set per run",
    "model": {"reasoning_vocab_size": 0, "name_or_path": "m"},
    "training": {"learning_rate": 1e-4, "max_steps": 20},
    "paths": {"output_root": "outputs", "cache_dir": "/c"},
}


def write_run(root: Path, name: str, n: int, seed: int, heldout: list[float], reward: float = 0.5, **config) -> Path:
    """A run dir as training leaves it: config.yaml and metrics.jsonl with a held-out eval every 10 steps."""
    run = root / name
    run.mkdir(parents=True)
    cfg = json.loads(json.dumps(BASE_CONFIG))
    cfg["seed"], cfg["output_dir"], cfg["model"]["reasoning_vocab_size"] = seed, str(run), n
    for key, value in config.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "reward": reward, "think/length": 10.0 + n / 100, "think/closed_fraction": 1.0})
    for i, value in enumerate(heldout):
        lines.append({"step": 10 * i, "heldout/pass@1": value, "heldout/closed_answered_rate": min(1.0, 2 * value)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_statistics_have_the_known_answer(tmp_path):
    # baseline: final 0.4/0.5/0.6; reasoning: exactly +0.1 on every seed
    for seed, final in zip([1, 2, 3], [0.4, 0.5, 0.6], strict=True):
        write_run(tmp_path, f"base{seed}", 0, seed, [0.0, final / 2, final], reward=0.3)
        write_run(tmp_path, f"rv{seed}", 64, seed, [0.0, (final + 0.1) / 2, final + 0.1], reward=0.4)
    runs, swept = find_runs([tmp_path / p for p in sorted(os.listdir(tmp_path))])
    assert swept == []
    result = compare(runs, ["model.reasoning_vocab_size"], target=0.3, reps=2000)
    base, rv = result["arms"]
    assert base["baseline"] and base["values"] == {"model.reasoning_vocab_size": 0}
    assert [r["seed"] for r in rv["runs"]] == [1, 2, 3]
    final = base["stats"]["final_pass@1"]
    assert final["mean"] == pytest.approx(0.5) and 0.4 <= final["ci_low"] < 0.5 < final["ci_high"] <= 0.6
    # area under (0, 0) (10, f/2) (20, f) over 20 steps = f/2
    assert base["stats"]["auc_pass@1"]["mean"] == pytest.approx(0.25)
    # steps to 0.3: the curves reach it at step 20 (seeds 1, 2) and at step 10 (seed 3: 0.6 / 2)
    assert base["stats"]["steps_to_target"]["values"] == [20, 20, 10]
    assert rv["stats"]["train_reward"]["mean"] == pytest.approx(0.4)
    assert base["stats"]["final_answered"]["mean"] == pytest.approx(2.8 / 3)  # finals 0.4, 0.5, 0.6 -> 0.8, 1, 1
    diff = result["differences"][0]["final_pass@1"]
    assert diff["paired"] and diff["mean_diff"] == pytest.approx(0.1)
    assert diff["ci_low"] == pytest.approx(0.1) and diff["ci_high"] == pytest.approx(0.1)  # the same gain on each seed
    # P(X > Y) over the 9 pairs of (0.5, 0.6, 0.7) x (0.4, 0.5, 0.6): 6 wins, 2 ties, 1 loss -> (6 + 1) / 9
    assert diff["prob_improvement"] == pytest.approx(7 / 9)
    assert result["target"] == 0.3
    # the per-run table: every row has as many cells as its header, the training reward under its own column
    from rlvr_vocab.comparison import markdown

    table = markdown(result).split("Per run:")[1].strip().splitlines()
    assert {row.count("|") for row in table} == {table[0].count("|")}
    assert "training reward" in table[0] and "| 0.400 | rv1 |" in table[-3]


def test_unpaired_difference_and_probability_of_improvement():
    r = compare_values({1: 1.0, 2: 1.0}, {3: 0.0, 4: 0.0, 5: 0.0}, reps=500)
    assert not r["paired"] and r["mean_diff"] == 1.0 and r["prob_improvement"] == 1.0
    assert r["ci_low"] == 1.0 and r["pi_ci_low"] == 1.0


def test_runs_that_differ_in_more_than_the_variable_are_refused(tmp_path):
    write_run(tmp_path, "a", 0, 1, [0.1, 0.2, 0.3])
    write_run(tmp_path, "b", 64, 1, [0.1, 0.2, 0.3], training__learning_rate=5e-2)
    runs, _ = find_runs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(CompareError, match=r"training\.learning_rate: 0\.0001 in a vs 0\.05 in b"):
        group_runs(runs, ["model.reasoning_vocab_size"])
    # seeds, output dirs and paths may differ; the CLI says so with rc 2
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 2


def test_unfinished_runs_are_refused_unless_allowed(tmp_path):
    write_run(tmp_path, "a", 0, 1, [0.1, 0.2, 0.3], training__max_steps=40)
    write_run(tmp_path, "b", 64, 1, [0.1, 0.2, 0.3], training__max_steps=40)
    runs, _ = find_runs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(CompareError, match="unfinished runs"):
        compare(runs, ["model.reasoning_vocab_size"], reps=100)
    assert compare(runs, ["model.reasoning_vocab_size"], reps=100, require_finished=False)["arms"]
    # as they stood at step 10: the held-out eval of step 10 is the final one, later records are dropped
    at10 = compare(runs, ["model.reasoning_vocab_size"], reps=100, max_step=10)
    assert at10["max_step"] == 10 and at10["arms"][0]["stats"]["final_pass@1"]["mean"] == pytest.approx(0.2)
    with pytest.raises(CompareError, match="--max-step 30: these runs stopped before it"):
        compare(runs, ["model.reasoning_vocab_size"], reps=100, max_step=30)


def test_mini_sweep_through_the_one_gpu_launcher_feeds_rlvr_compare(tmp_path):
    """2 arms x 2 seeds x 2 steps, all points side by side (hydra/launcher=one_gpu), then rlvr-compare on the sweep."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "grpo_train.py", "-m", "hydra/launcher=one_gpu", "experiment=debug", "dataset.think=true",
        "model.reasoning_vocab_size=0,8", "seed=1,2", "training.max_steps=2", "training.save_steps=100",
        "eval.every_steps=1", "eval.max_samples=4", "eval.batch_size=4", "dataset.generator.seed=0",
        f"paths.cache_dir={CACHE_DIR}", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(points) == 4
    out = tmp_path / "cmp"
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "rlvr-compare"), str(sweep), "--out", str(out), "--reps", "200"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    result = json.loads((out / "compare.json").read_text())
    assert result["by"] == ["model.reasoning_vocab_size"]  # from Hydra's record: the swept keys but seed
    assert [a["values"]["model.reasoning_vocab_size"] for a in result["arms"]] == [0, 8]
    assert all(sorted(r["seed"] for r in a["runs"]) == [1, 2] for a in result["arms"])
    assert all(a["stats"]["final_pass@1"]["n"] == 2 for a in result["arms"])
    assert result["arms"][1]["stats"]["reasoning_span_fraction"]["n"] == 2  # logged by the reasoning arm only
    assert result["arms"][0]["stats"]["reasoning_span_fraction"]["n"] == 0
    assert {p.name for p in out.glob("*.png")} >= {"heldout.png", "reward.png", "think_length.png"}
    assert "minus" in (out / "compare.md").read_text()


def test_a_point_that_fails_in_a_sweep_leaves_its_traceback_in_its_log(tmp_path):
    """Seen on the GPU: two points ran out of memory and their logs said only 'Job completed successfully'."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "grpo_train.py", "-m", "hydra/launcher=one_gpu", "experiment=debug",
        "model.tiny.num_key_value_heads=3", f"paths.cache_dir={CACHE_DIR}", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    [log] = list(sweep.glob(".submitit/*/*_log.out"))
    text = log.read_text()
    assert "Training failed" in text and "Traceback" in text
