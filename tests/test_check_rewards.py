"""rlvr-check-rewards: derived wrong answers, the pure check on real gold answers, the Hydra app end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose_config
from hydra.core.global_hydra import GlobalHydra
from test_rewards import MATH_GOLDS

from rlvr_vocab.cli.check_rewards import check_rewards, format_summary, near_misses, run, wrong_answer
from rlvr_vocab.rewards import REWARD_REGISTRY, get_reward_funcs, normalize_gold
from rlvr_vocab.rewards.text import completion_text, last_boxed

RESULT_KEYS = {"gold_correct", "gold_total", "wrong_scored_correct", "skipped", "failures"}


def test_wrong_answer_is_deterministic_and_differs():
    for gold in MATH_GOLDS + ["18", "-3", "0", "1,000", "9" * 5000]:
        wrong = wrong_answer(gold)
        assert wrong == wrong_answer(gold) and normalize_gold(wrong) != normalize_gold(gold), gold
    assert wrong_answer("99") == "100" and wrong_answer("-5") == "-6" and wrong_answer("007") == "008"
    assert wrong_answer(r"\binom{5}{2}") == r"\binom{6}{2}"  # C(5,3) would equal C(5,2)
    assert wrong_answer(r"\text{Room 101}") == r"(\text{Room 101})+1"  # digits in \text{} are words


def test_check_math_style_golds():
    funcs, weights = get_reward_funcs({"funcs": ["accuracy", "boxed_format"], "weights": [1.0, 0.2]})
    result = check_rewards([{"answer": g} for g in MATH_GOLDS], funcs, weights)
    assert result["gold_total"] == len(MATH_GOLDS) and result["skipped"] == 0
    assert result["gold_correct"] >= 0.99 * len(MATH_GOLDS)  # measured: all of them
    assert result["wrong_scored_correct"] == 0
    assert result["weighted_total_mean"]["gold"] == pytest.approx(1.2)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "reward").glob("*.yaml")))
def test_check_every_reward_set_on_numeric_golds(name):
    from omegaconf import OmegaConf

    funcs, weights = get_reward_funcs(OmegaConf.load(REPO / "conf" / "reward" / f"{name}.yaml"))
    rows = [{"answer": str(n)} for n in (0, 7, -3, 18, 1000, 123456)]
    result = check_rewards(rows, funcs, weights)
    assert result["judging_rewards"], name
    assert (result["gold_correct"], result["gold_total"], result["wrong_scored_correct"]) == (6, 6, 0), result


def test_near_misses_join_the_wrong_answers():
    """A reward that rounds to 6 decimals (math-verify's number comparison, alone) is caught; accuracy is not."""

    def rounds_to_6(completions, answer, **kwargs):
        return [
            float(round(float(last_boxed(completion_text(c))), 6) == round(float(g), 6))
            for c, g in zip(completions, answer, strict=True)
        ]

    rounds_to_6.correct_reward = 1.0
    assert near_misses("0.0000672") == ["0.0000673"] and near_misses("2") == ["3", "2.0000001"]
    rows = [{"answer": g} for g in ("0.0000672", "0.5", "18", "3.1415926")]
    result = check_rewards(rows, [rounds_to_6])
    assert result["gold_correct"] == 4 and result["wrong_scored_correct"] == 4
    assert {f["wrong"] for f in result["failures"]} == {"0.0000673", "0.5000001", "18.0000001", "3.1415927"}
    assert result["wrong_answers"] == 4 + 4 + 1  # wrong_answer for each; "0.6" and "19" only once (equal to it)
    for name in ("accuracy", "boxed_accuracy", "last_number", "cookbook_number"):
        funcs, weights = get_reward_funcs({"funcs": [name]})
        result = check_rewards(rows, funcs, weights)
        assert (result["gold_correct"], result["wrong_scored_correct"]) == (4, 0), (name, result["failures"])


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "reward").glob("*.yaml")))
def test_every_reward_set_scores_every_gsm8k_gold_and_no_wrong_answer(name, gsm8k_dir):
    from omegaconf import OmegaConf

    golds = [json.loads(line)["answer"].rsplit("####", 1)[1].strip().replace(",", "")
             for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()]  # fmt: skip
    funcs, weights = get_reward_funcs(OmegaConf.load(REPO / "conf" / "reward" / f"{name}.yaml"))
    result = check_rewards([{"answer": g} for g in golds], funcs, weights)
    counts = (result["gold_correct"], result["gold_total"], result["wrong_scored_correct"])
    assert counts == (1319, 1319, 0), result["failures"][:5]
    assert result["wrong_answers"] > 1319  # near misses too
    if name == "accuracy":
        assert result["means"]["accuracy"] == {"gold": 1.0, "wrong": 0.0}


def test_check_reports_broken_rewards():
    def always_right(completions, **kwargs):
        return [1.0] * len(completions)

    def never_right(completions, **kwargs):
        return [0.0] * len(completions)

    def not_applicable(completions, **kwargs):
        return [None] * len(completions)

    for f in (always_right, never_right, not_applicable):
        f.correct_reward = 1.0
    rows = [{"answer": "1"}, {"answer": "2"}]
    result = check_rewards(rows, [always_right])
    assert result["wrong_scored_correct"] == 2 and result["failures"][0]["kind"] == "wrong_scored_correct"
    result = check_rewards(rows, [never_right])
    assert result["gold_correct"] == 0 and {f["kind"] for f in result["failures"]} == {"gold_not_correct"}
    result = check_rewards(rows, [not_applicable])
    assert result["skipped"] == 2 and result["gold_total"] == 0
    assert "wrong answers scored correct: 0; skipped rows: 2" in format_summary(result)
    only_format, _ = get_reward_funcs({"funcs": ["boxed_format"]})
    result = check_rewards(rows, only_format)
    assert result["judging_rewards"] == [] and "nothing to check" in format_summary(result)


def test_run_writes_json(tmp_path, gsm8k_dir):
    out = tmp_path / "check.json"
    cfg = compose_config(
        "dataset=gsm8k",
        f"dataset.path={gsm8k_dir / 'test.jsonl'}",
        "reward=strict_boxed",
        f"output_file={out}",
        "check_rewards.limit=100",
        "check_rewards.max_failures=3",
    )
    result = run(cfg)
    written = json.loads(out.read_text())
    assert RESULT_KEYS <= set(written)
    assert written["rows"] == 100 and written["gold_correct"] == 100 and written["wrong_scored_correct"] == 0
    assert written["reward_funcs"] == ["boxed_accuracy", "boxed_format"] and written["weights"] == [1.0, 0.2]
    assert result["gold_total"] == written["gold_total"]


def test_console_app_quickstart_set(tmp_path):
    """The installed console script (as the README runs it), from a folder other than the repo."""
    out = tmp_path / "check.json"
    script = Path(sys.executable).with_name("rlvr-check-rewards")
    assert script.is_file(), f"{script} is not installed (pip install -e .)"
    proc = subprocess.run(
        [str(script), "experiment=quickstart", f"output_file={out}", "check_rewards.limit=200",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gold answers scored correct: 200/200" in proc.stdout
    result = json.loads(out.read_text())
    assert result["reward_funcs"] == ["last_number", "boxed_format"] and result["wrong_scored_correct"] == 0


def test_console_app_exits_1_when_a_wrong_answer_is_paid(tmp_path, monkeypatch, gsm8k_dir):
    from rlvr_vocab.cli import check_rewards as app

    def always_right(completions, **kwargs):
        return [1.0] * len(completions)

    always_right.correct_reward = 1.0
    monkeypatch.setitem(REWARD_REGISTRY, "accuracy", always_right)
    monkeypatch.setattr(
        sys,
        "argv",
        ["rlvr-check-rewards", "dataset=gsm8k", f"dataset.path={gsm8k_dir / 'test.jsonl'}", "check_rewards.limit=5",
         f"hydra.run.dir={tmp_path}", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"],
    )  # fmt: skip
    try:
        with pytest.raises(SystemExit) as exit_info:
            app.main()
    finally:
        GlobalHydra.instance().clear()
    assert exit_info.value.code == 1
