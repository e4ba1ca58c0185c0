"""Rewards on hand-written completions, real GSM8K gold answers and a MATH-style gold list; registry, pickling, fuzz."""

from __future__ import annotations

import json
import pickle
import random
import re
import string
import threading
import time
from pathlib import Path

import pytest
from conftest import GSM8K_DIR
from omegaconf import OmegaConf

from rlvr_vocab.rewards import REWARD_REGISTRY, Accuracy, build_reward, get_reward_funcs, gold_is_parseable
from rlvr_vocab.rewards.accuracy import normalize_gold
from rlvr_vocab.rewards.cookbook import (
    CookbookAnswer,
    CookbookFormatApprox,
    CookbookFormatExact,
    CookbookNumber,
)
from rlvr_vocab.rewards.format import SoftOverlong, ThinkFormat, boxed_format_reward
from rlvr_vocab.rewards.graded import BinaryBoxed, BoxedAccuracy, last_number_reward
from rlvr_vocab.rewards.text import repair_latex_shorthand

REPO = Path(__file__).resolve().parents[1]

# MATH / DeepScaleR-style gold answers as the datasets write them: fractions (also TeX shorthand),
# roots, pi, intervals, tuples, sets, degrees, percent, money, units, text and multiple-choice answers,
# negative numbers, expressions, equations. No matrices.
MATH_GOLDS = [
    r"\left( 3, \frac{\pi}{2} \right)", r"p - q", r"\frac{14}{3}", r"9", r"\text{Evelyn}", r"42", r"90^\circ",
    r"3\sqrt{13}", r"2220", r"\frac{3}{56}", r"-2 + 7i", r"\sqrt{51}", r"6 - 5i", r"-50", r"\pi", r"\frac{1}{2}",
    r"[-2,7]", r"\text{(C)}", r"11\sqrt2", r"\frac43", r"\dfrac{1}{3}", r"10,\!080", r"\$18.90", r"5\text{ cm}",
    r"x^2+7x+10", r"(-\infty,-2)\cup(3,\infty)", r"2, -2", r"0.5", r"20\%", r"\frac{\sqrt{3}}{2}", r"\tfrac{1}{2}",
    r"\frac 12", r"\sqrt3", r"\frac{1+\sqrt{5}}{2}", r"3^{\circ}", r"\text{odd}", r"\text{neither}", r"1.25",
    r"-\frac{2}{3}", r"(0,1]", r"\left[ -\frac{1}{2}, 1\right)", r"2\pi", r"\frac{\pi}{4}", r"\text{Monday}", r"-1",
    r"(1,-2)", r"(2,-1,3)", r"3\frac{1}{2}", r"10\sqrt{2}", r"\frac{9}{4}\pi", r"4\sqrt{3}", r"1,\!000", r"10{,}000",
    r"\frac{-1}{2}", r"y = 2x + 3", r"x = 5", r"\infty", r"\{1, 2, 3\}", r"-\sqrt{3}", r"8\text{ inches}",
    r"\text{E}", r"\frac{3\sqrt{3}}{4}", r"1 - \sqrt{2}", r"\frac95", r"\frac{2}3", r"\dfrac{\sqrt{2}}{2}",
    r"3, 5, 7", r"2^{10}", r"\sqrt[3]{2}", r"\log_2 3", r"0", r"1000000", r"120^\circ", r"\mbox{odd}",
    r"\textbf{(B)}", r"(-\infty, 0]", r"[2, \infty)", r"(1,2)\cup(3,4)", r"a+b", r"n^2", r"\$3", r"6\frac{2}{3}",
    r"\frac{100}{3}\text{ dollars}", r"48\pi", r"\frac{\sqrt{6}}{3}", r"$\frac{1}{2}$", r"\boxed{5}", r"1/2",
    r"x \in [2, 5)", r"\pm 2", r"2\sqrt{2} + 1", r"\frac{1}{2}, \frac{1}{3}", r"k = 3", r"(A)", r"B", r"\$5.00",
    r"5 \text{ dollars}", r"12\%", r"\sqrt{2}/2", r"\frac{\sqrt{2}}2", r"e^{2}", r"\ln 2", r"1.5\times 10^{3}",
    r"3 \cdot 2^{4}", r"\frac{a}{b}", r"-\frac{\pi}{6}", r"\left\{ 1, 2 \right\}", r"\emptyset", r"(-\infty, \infty)",
    r"x \geq 2", r"x < -1 \text{ or } x > 3", r"7 \text{ and } 8", r"90^{\circ}", r"\frac{1}{\sqrt{2}}",
    r"0.\overline{3}", r"1\frac{1}{2}", r"\dfrac{7}{12}", r"\frac{2}{3}\text{ cups}", r"4, 6, 14, 15",
    r"27\pi \text{ cubic units}", r"-\infty", r"1,000,000", r"10^{-3}", r"a=2, b=3", r"f(x) = 2x + 1",
    r"\binom{5}{2}", r"5!", r"\text{yes}", r"\textbf{(E) }25",
]  # fmt: skip

# Hand-written wrong answers: off by one, sign flips, swapped or different fractions, near misses.
MATH_WRONG = {
    r"\left( 3, \frac{\pi}{2} \right)": [r"(3, \frac{\pi}{3})", r"(\frac{\pi}{2}, 3)", r"(3, \pi)", "3"],
    r"\frac{14}{3}": [r"\frac{3}{14}", r"\frac{14}{5}", r"-\frac{14}{3}", "4.67", "5"],
    r"\frac43": [r"\frac34", r"\frac{4}{5}", "1.33", r"\frac{8}{3}"],
    r"\frac 12": [r"\frac13", "0.51", "2", r"-\frac{1}{2}"],
    r"\frac{1}{2}": [r"\frac{1}{3}", r"\frac{2}{1}", "0.49", r"-0.5"],
    r"\sqrt{51}": [r"\sqrt{52}", r"\sqrt{50}", "51", r"-\sqrt{51}"],
    r"3\sqrt{13}": [r"3\sqrt{12}", r"\sqrt{39}", r"13\sqrt{3}", "3"],
    r"-2 + 7i": [r"2 + 7i", r"-2 - 7i", r"7 - 2i", "-2"],
    r"-50": ["50", "-49", "-51", r"\frac{-50}{2}"],
    r"90^\circ": [r"91^\circ", r"89^\circ", "45", r"180^\circ"],
    r"\pi": [r"2\pi", r"-\pi", r"\frac{\pi}{2}", "3.14"],
    r"[-2,7]": [r"(-2,7)", r"[-2,7)", r"[2,7]", r"[-2,8]"],
    r"(0,1]": [r"(0,1)", r"[0,1]", r"(0,2]", r"[0,1)"],
    r"\text{(C)}": [r"\text{(D)}", "D", r"\text{(B)}"],
    r"\text{Evelyn}": [r"\text{Bob}", r"\text{Evelyn Smith}"],
    r"0.5": ["0.6", "0.4", "-0.5", r"\frac{1}{3}"],
    r"20\%": [r"21\%", r"2\%", "0.21"],
    r"x^2+7x+10": [r"x^2+7x+11", r"x^2-7x+10", r"x^2+10"],
    r"(-\infty,-2)\cup(3,\infty)": [r"(-\infty,-2]\cup[3,\infty)", r"(-\infty,-3)\cup(2,\infty)", r"(-2,3)"],
    r"2, -2": ["2", "-2", "2, -3", "4, -4"],
    r"(1,-2)": [r"(-2,1)", r"(1,2)", r"(1,-3)"],
    r"(2,-1,3)": [r"(2,1,3)", r"(3,-1,2)", r"(2,-1,4)"],
    r"3\frac{1}{2}": [r"\frac{3}{2}", "3.6", r"4\frac{1}{2}"],
    r"10,\!080": ["10,081", "10080.5", "1008"],
    r"1,\!000": ["1,001", "999", "100"],
    r"\$18.90": [r"\$18.91", r"\$19.90", "18.9001"],
    r"5\text{ cm}": [r"6\text{ cm}", "4", r"-5\text{ cm}"],
    r"-1": ["1", "-2", "0"],
    r"0": ["1", "-1", "0.01"],
    r"1000000": ["1000001", "999999", "100000"],
    r"\infty": [r"-\infty", "0", "1000000"],
    r"\{1, 2, 3\}": [r"\{1, 2\}", r"\{1, 2, 4\}", r"\{1, 2, 3, 4\}"],
    r"-\sqrt{3}": [r"\sqrt{3}", r"-\sqrt{2}", "-1.73"],
    r"1 - \sqrt{2}": [r"\sqrt{2} - 1", r"1 + \sqrt{2}", r"1 - \sqrt{3}"],
    r"2^{10}": ["1023", "1025", r"2^{11}", r"10^2"],
    r"\log_2 3": [r"\log_3 2", r"\log_2 4", "1.58"],
    r"y = 2x + 3": [r"y = 2x - 3", r"y = 3x + 2", r"y = 2x + 4"],
    r"x = 5": [r"x = -5", r"x = 6", "4"],
    r"1.25": ["1.26", "1.24", r"\frac{5}{3}", "-1.25"],
    r"\binom{5}{2}": ["11", "9", r"\binom{5}{1}"],
    r"a+b": ["a-b", "ab", "a+2b"],
    r"\pm 2": ["2", "-2", r"\pm 3"],
    r"12\%": [r"13\%", r"1.2\%", "0.13"],
    r"e^{2}": [r"e^{3}", r"2e", "7.4"],
    r"0.\overline{3}": ["0.3", "0.34", r"\frac{1}{4}"],
    r"1.5\times 10^{3}": ["1501", r"1.5\times 10^{4}", "150"],
}  # fmt: skip


def boxed(answer: str) -> str:
    return f"Let me work this out step by step.\nSo the answer is \\boxed{{{answer}}}."


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def gsm8k_golds(split: str = "test") -> list[str]:
    path = GSM8K_DIR / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K not found at {path} (shipped in data/gsm8k)")
    with path.open() as f:
        return [json.loads(line)["answer"].rsplit("####", 1)[1].strip().replace(",", "") for line in f]


@pytest.fixture(scope="module")
def accuracy():
    return Accuracy()


# ------------------------------------------------------------------------------------------- registry
def test_registry_names_and_metric_names():
    assert set(REWARD_REGISTRY) >= {
        "accuracy", "last_number", "boxed_format", "boxed_accuracy", "binary_boxed", "think_format", "soft_overlong",
        "cookbook_format_exact", "cookbook_format_approx", "cookbook_answer", "cookbook_number",
    }  # fmt: skip
    for name in REWARD_REGISTRY:
        assert build_reward(name).__name__ == name  # TRL logs rewards/<__name__>/mean


@pytest.mark.parametrize("name", sorted(REWARD_REGISTRY))
def test_pickle_round_trip(name):
    func = build_reward(name)
    copy = pickle.loads(pickle.dumps(func))
    assert copy.__name__ == name
    completions = [conv(boxed("7")), conv("<start_working_out>x<end_working_out><SOLUTION>7</SOLUTION>"), conv("8")]
    kwargs = dict(prompts=[None] * 3, completions=completions, completion_ids=[[1] * 5] * 3, answer=["7"] * 3)
    assert copy(**kwargs) == func(**kwargs)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"reward\.funcs.*'acuracy'.*valid names: accuracy, binary_boxed"):
        get_reward_funcs({"funcs": ["acuracy"]})


def test_weights_and_kwargs_errors():
    with pytest.raises(ValueError, match=r"reward\.weights has 1 entries but reward\.funcs has 2"):
        get_reward_funcs({"funcs": ["accuracy", "boxed_format"], "weights": [1.0]})
    with pytest.raises(ValueError, match=r"reward\.kwargs\.soft_overlong"):
        get_reward_funcs({"funcs": ["soft_overlong"], "kwargs": {"soft_overlong": {"max_len": 5}}})
    with pytest.raises(ValueError, match=r"reward\.kwargs\.boxed_format.*takes no arguments"):
        get_reward_funcs({"funcs": ["boxed_format"], "kwargs": {"boxed_format": {"x": 1}}})
    with pytest.raises(ValueError, match=r"reward\.kwargs has arguments for \['accuracy'\]"):
        get_reward_funcs({"funcs": ["boxed_format"], "kwargs": {"accuracy": {}}})
    with pytest.raises(ValueError, match=r"reward\.funcs is empty"):
        get_reward_funcs({"funcs": []})
    with pytest.raises(ValueError, match="timeouts are whole seconds"):
        Accuracy(parsing_timeout=0.5)


def test_kwargs_reach_constructors_from_omegaconf():
    cfg = OmegaConf.create(
        {
            "funcs": ["soft_overlong", "think_format"],
            "weights": None,
            "kwargs": {"soft_overlong": {"max_completion_length": 10, "soft_cache_length": 5}},
        }
    )
    (overlong, think), weights = get_reward_funcs(cfg)
    assert weights == [1.0, 1.0]
    assert overlong(completions=["a"], completion_ids=[[0] * 8]) == [-0.6]
    assert isinstance(think, ThinkFormat)


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "reward").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_reward_config_resolves(path):
    cfg = OmegaConf.load(path)
    assert set(cfg) == {"funcs", "weights", "kwargs"}  # the core's schema for the reward group
    funcs, weights = get_reward_funcs(cfg)
    assert [f.__name__ for f in funcs] == list(cfg.funcs) and len(weights) == len(funcs)
    for line in path.read_text().splitlines():  # every key carries a comment
        if re.match(r"^\w+:", line):
            assert "#" in line, f"{path.name}: key without a comment: {line}"


# ------------------------------------------------------------------------------------------- accuracy
def test_accuracy_hand_written(accuracy):
    cases = [
        (r"So the answer is $\boxed{18}$.", "18", 1.0),
        (r"\boxed{18.0}", "18", 1.0),
        (r"\boxed{\$18}", "18", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        (r"\boxed{1000 \text{ dollars}}", "1000", 1.0),
        (r"I think $\frac{4}{3}$, i.e. \boxed{\frac{4}{3}}", r"\frac43", 1.0),
        (r"\boxed{\frac43}", r"\frac43", 1.0),  # shorthand in the completion too
        (r"\boxed{\dfrac{4}{3}}", r"\frac{4}{3}", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
        (r"\boxed{-2, 2}", "2, -2", 1.0),  # a set of solutions
        (r"\boxed{5}", "x = 5", 1.0),
        (r"\boxed{90}", r"90^\circ", 1.0),
        (r"\boxed{\text{(C)}}", r"\text{(C)}", 1.0),
        (r"wrong first \boxed{17} then \boxed{18}", "18", 0.0),  # two different boxed answers: not 18
        (r"\boxed{19}", "18", 0.0),
        (r"\boxed{-18}", "18", 0.0),
        (r"\boxed{\frac{3}{4}}", r"\frac43", 0.0),
        (r"\boxed{1.0000002}", "1.0000001", 0.0),  # math-verify alone rounds to 6 decimals and says 1.0
        (r"The answer is 18.", "18", 0.0),  # TRL: LaTeX extraction only, no bare numbers
        (r"\boxed{}", "18", 0.0),
        (r"\boxed{18", "18", 0.0),  # unclosed box
        ("", "18", 0.0),
        (r"\boxed{18}", "", None),  # no gold: the row is skipped
    ]
    got = accuracy([conv(c) for c, _, _ in cases], answer=[g for _, g, _ in cases])
    for (completion, gold, expected), reward in zip(cases, got, strict=True):
        assert reward == expected, (completion, gold, reward)


def test_accuracy_accepts_plain_string_completions_and_logs_prefixed_columns(accuracy):
    logged = {}
    rewards = accuracy(["\\boxed{7}", "\\boxed{8}"], answer=["7", "7"], log_extra=logged.__setitem__)
    assert rewards == [1.0, 0.0]
    assert logged == {"accuracy/gold": ["$7$", "$7$"], "accuracy/answer_parsed": ["7", "8"]}


def test_accuracy_matches_trl_accuracy_reward():
    """Same grading as TRL's function, given the same gold string and no TeX shorthand to repair."""
    from trl.rewards import accuracy_reward

    golds = ["18", "-3", "1000", r"\frac{1}{3}", r"3\sqrt{13}", r"(3, \frac{\pi}{2})", r"[-2,7]", r"\text{Evelyn}",
             r"90^\circ", r"20\%", r"x^2+7x+10", "0.5", r"\{1, 2\}", r"2\pi", r"5\text{ cm}"]  # fmt: skip
    templates = [r"\boxed{%s}", r"so $%s$", r"final answer is $%s$. I hope", r"\boxed{%s} and \boxed{1}",
                 r"\[ %s \]", "%s", r"\boxed{%s + 1}", r"Answer: \(%s\)", r"\boxed{\text{%s}}", r"\fbox{%s}"]  # fmt: skip
    completions, solutions = [], []
    for gold in golds:
        for answer in (gold, "17", r"-\frac{1}{3}", r"\sqrt{13}"):
            for template in templates:
                completions.append(conv(template % answer))
                solutions.append(gold)
    normalized = [normalize_gold(g) for g in solutions]
    expected = accuracy_reward(completions, normalized)
    assert Accuracy(repair_completions=False)(completions, answer=solutions) == expected
    assert Accuracy()(completions, answer=solutions) == expected  # nothing here for the repair to change
    assert sum(r == 1.0 for r in expected) >= len(golds) * 3  # the corpus has right answers (measured: 49)


def test_trl_alone_misses_shorthand_and_bare_gold():
    """Why normalize_gold and the completion repair exist (numbers measured upstream: 392/500 raw MATH-500)."""
    from trl.rewards import accuracy_reward

    assert accuracy_reward([conv(r"\boxed{3\sqrt{13}}")], [r"3\sqrt{13}"]) == [0.0]  # bare gold parses as 3
    assert accuracy_reward([conv(r"\boxed{\frac43}")], [r"$\frac43$"]) == [0.0]  # shorthand in the completion
    assert Accuracy()([conv(r"\boxed{3\sqrt{13}}"), conv(r"\boxed{\frac43}")], answer=[r"3\sqrt{13}", r"\frac43"]) == [
        1.0,
        1.0,
    ]
    assert Accuracy(repair_completions=False)([conv(r"\boxed{\frac43}")], answer=[r"\frac43"]) == [0.0]


def test_normalize_gold_and_parseability():
    assert normalize_gold("1,000") == normalize_gold("1000") == normalize_gold("$1000$") == "$1000$"
    assert normalize_gold("10{,}000") == normalize_gold(r"10,\!000") == "$10000$"
    assert normalize_gold("2, 3") == "$2, 3$"  # a list, not a thousands separator
    assert normalize_gold("[1,100]") == "$[1,100]$"  # an interval, not 1100: only whole-answer numbers lose commas
    assert normalize_gold(r"\$1,000.50") == r"$\$1000.50$" and normalize_gold("-1,000") == "$-1000$"
    assert Accuracy()([r"\boxed{[1, 100]}", r"\boxed{1100}"], answer=["[1,100]"] * 2) == [1.0, 0.0]
    assert normalize_gold(r"\boxed{\frac 12}") == r"$\frac {1}{2}$"
    assert normalize_gold("$5") == r"$\$5$"
    assert normalize_gold("18.") == "$18$"
    assert normalize_gold(None) == ""
    assert all(gold_is_parseable(g) for g in MATH_GOLDS)
    assert all(gold_is_parseable(g, strict=True) for g in MATH_GOLDS)
    assert not gold_is_parseable("") and not gold_is_parseable("   ")


def test_repair_latex_shorthand_only_changes_shorthand():
    assert repair_latex_shorthand(r"\frac{a}{b} + \sqrt{x} + \sqrt[3]{y}") == r"\frac{a}{b} + \sqrt{x} + \sqrt[3]{y}"
    assert repair_latex_shorthand(r"\frac{\frac12}3") == r"\frac{\frac{1}{2}}{3}"
    assert repair_latex_shorthand(r"\binom52") == r"\binom{5}{2}"
    assert repair_latex_shorthand(r"\fraction \sqrtx") == r"\fraction \sqrtx"  # not these commands
    assert repair_latex_shorthand(r"\frac\alpha\beta") == r"\frac{\alpha}{\beta}"
    assert repair_latex_shorthand(r"\frac\left(") == r"\frac\left("  # not a symbol: left alone
    assert repair_latex_shorthand("\\frac{" * 5000) == "\\frac{" * 5000
    assert repair_latex_shorthand(r"\sqrt[3") == r"\sqrt[3"


def test_accuracy_gsm8k_test_gold_answers(accuracy):
    """All 1,319 GSM8K test gold answers, boxed, score 1.0 (target >= 99.5%); the next integer never does."""
    golds = gsm8k_golds("test")
    assert len(golds) == 1319
    right = accuracy([conv(boxed(g)) for g in golds], answer=golds)
    wrong = accuracy([conv(boxed(str(int(g) + 1))) for g in golds], answer=golds)
    negated = [g for g in golds if int(g) != 0]
    flipped = accuracy([conv(boxed(str(-int(g)))) for g in negated], answer=negated)
    assert sum(r == 1.0 for r in right) / len(golds) >= 0.995
    assert sum(r == 1.0 for r in right) == len(golds)  # measured: 1319/1319
    assert not any(r == 1.0 for r in wrong) and not any(r == 1.0 for r in flipped)
    # the same gold written with thousands separators, as GSM8K's own '#### 1,000'
    with_commas = [f"{int(g):,}" for g in golds if abs(int(g)) >= 1000]
    assert accuracy([conv(boxed(g)) for g in with_commas], answer=with_commas) == [1.0] * len(with_commas)


def test_accuracy_math_style_gold_answers(accuracy):
    assert len(MATH_GOLDS) >= 60
    rewards = accuracy([conv(boxed(g)) for g in MATH_GOLDS], answer=MATH_GOLDS)
    failed = [g for g, r in zip(MATH_GOLDS, rewards, strict=True) if r != 1.0]
    assert len(failed) <= 0.01 * len(MATH_GOLDS), failed  # target >= 99%; measured 100%


def test_accuracy_never_pays_wrong_math_style_answers(accuracy):
    from rlvr_vocab.cli.check_rewards import wrong_answer

    golds, wrongs = [], []
    for gold, answers in MATH_WRONG.items():
        assert gold in MATH_GOLDS
        golds += [gold] * len(answers)
        wrongs += answers
    for gold in MATH_GOLDS:  # derived: first number + 1, and last number + 1 (not for \binom's symmetry)
        golds.append(gold)
        wrongs.append(wrong_answer(gold))
        numbers = list(re.finditer(r"\d+", gold))
        if numbers and "binom" not in gold and "text" not in gold and "mbox" not in gold:
            m = numbers[-1]
            golds.append(gold)
            wrongs.append(gold[: m.start()] + str(int(m.group()) + 1) + gold[m.end() :])
    rewards = accuracy([conv(boxed(w)) for w in wrongs], answer=golds)
    paid = [(g, w) for g, w, r in zip(golds, wrongs, rewards, strict=True) if r == 1.0]
    assert len(golds) > 300
    assert paid == []


def test_accuracy_off_the_main_thread_uses_a_worker_process():
    accuracy = Accuracy()
    out = {}
    thread = threading.Thread(
        target=lambda: out.update(r=accuracy([conv(r"\boxed{\frac43}"), conv(r"\boxed{2}")], answer=[r"\frac43"] * 2))
    )
    thread.start()
    thread.join(timeout=180)
    assert out["r"] == [1.0, 0.0]
    assert accuracy._worker is not None and accuracy._worker._proc.is_alive()
    pickle.dumps(accuracy)  # the worker does not travel
    accuracy._worker.close()


def test_worker_deadline_kills_and_restarts():
    from rlvr_vocab.rewards.accuracy import _ScoringWorker

    worker = _ScoringWorker(parsing_timeout=1, verify_timeout=1, repair=True)
    try:
        assert worker.score([("$7$", r"\boxed{7}")]) == [(1.0, "7")]
        first = worker._proc
        worker.deadline_s = 0.2  # this one needs ~1 s (math-verify's own timeout): killed, scored 0.0
        assert worker.score([("$18$", r"\boxed{(1+x)^{1000}}")]) == [(0.0, "[timeout]")]
        assert worker._proc is None and not first.is_alive()
        worker.deadline_s = 60.0
        assert worker.score([("$7$", r"\boxed{8}")]) == [(0.0, "8")]  # a fresh child
    finally:
        worker.close()


def test_worker_that_cannot_start_falls_back_to_in_thread_grading(monkeypatch):
    from rlvr_vocab.rewards.accuracy import _ScoringWorker

    def refuse(self):
        raise AssertionError("daemonic processes are not allowed to have children")

    monkeypatch.setattr(_ScoringWorker, "_start", refuse)
    worker = _ScoringWorker(parsing_timeout=1, verify_timeout=1, repair=True)
    assert worker.score([("$7$", r"\boxed{7}"), ("$7$", r"\boxed{8}")]) == [(1.0, "7"), (0.0, "8")]
    assert worker._unavailable


# --------------------------------------------------------------------------------- graded and format
def test_last_number():
    completions = ["3 + 4 = 7", "7 apples", "It is 7.", r"\boxed{7} (not 8)", r"7 \boxed{8}", "8", "no number",
                   "1,000 - 993 = 7", "-7", r"\boxed{-7}"]  # fmt: skip
    assert last_number_reward(completions, answer=["7"] * 8 + ["-7"] * 2) == [1.0] * 4 + [0.0] * 3 + [1.0] * 3
    assert last_number_reward(["1,000", "1000.0", "$1,000"], answer=["1000"] * 3) == [1.0] * 3
    assert last_number_reward(["x"], answer=[r"\frac{4}{3}"]) == [None]
    assert last_number_reward(["1" * 10000], answer=["1"]) == [0.0]


def test_boxed_format():
    completions = [r"\boxed{7}", r"so \boxed{\frac{1}{2}}.", r"\boxed{}", r"\boxed{7}\boxed{7}", r"\boxed{7", "7",
                   r"\boxed {7}", r"\boxed{\{1\}}"]  # fmt: skip
    assert boxed_format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_boxed_accuracy_counts_only_boxed_answers():
    f = BoxedAccuracy()
    completions = [r"\boxed{7}", r"The sum is \boxed{7.0}.", r"The answer is $7$.", "7", r"\boxed{8}", r"\boxed{}",
                   r"\boxed{8}. The answer is $7$.", r"\boxed{\frac{14}{2}}"]  # fmt: skip
    assert f(completions, answer=["7"] * len(completions)) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert Accuracy()([r"The answer is $7$."], answer=["7"]) == [1.0]  # accuracy takes it; the strict one does not
    assert f([r"\boxed{7}"], answer=[""]) == [None]


def test_boxed_accuracy_rejects_unevaluated_arithmetic():
    """math-verify evaluates a boxed expression: a model that boxes the question itself scored 1.0 under
    accuracy within ten GRPO steps on two-digit addition. The strict reward does not pay for it."""
    f = BoxedAccuracy()
    hacks = [r"\boxed{13 + 45}", r"What is 13 + 45? \boxed{13+45}", r"\boxed{60-2}", r"\boxed{2 \times 29}",
             r"\boxed{116/2}", r"\boxed{\frac{116}{2}}", r"\boxed{58} \boxed{13 + 45}"]  # fmt: skip
    assert Accuracy()(hacks[:6], answer=["58"] * 6) == [1.0] * 6  # TRL's grading takes them
    assert f(hacks, answer=["58"] * len(hacks)) == [0.0] * len(hacks)
    finals = [
        r"13 + 45 = 58, so \boxed{58}",
        r"\boxed{58.0}",
        r"\boxed{1,000}",
        r"\boxed{-3}",
        r"\boxed{13 + 45 = 58}",
    ]
    assert f(finals, answer=["58", "58", "1000", "-3", "58"]) == [1.0] * 5
    assert f([r"\boxed{58 = 13 + 45}"], answer=["58"]) == [0.0]  # math-verify reads the right-hand side
    assert f([r"\boxed{\frac{1}{2}}", r"\boxed{\frac{4}{3}}"], answer=["0.5", r"\frac43"]) == [1.0, 1.0]
    assert BinaryBoxed()([r"\boxed{13 + 45}"], answer=["58"]) == [-1.0]


def test_binary_boxed():
    f = BinaryBoxed()
    completions = [r"\boxed{7}", r"\boxed{8}", "7", r"\boxed{}", r"$7$"]
    assert f(completions, answer=["7"] * 5) == [1.0, -1.0, -0.5, -0.5, -0.5]
    assert f([r"\boxed{7}"], answer=[""]) == [None]
    assert BinaryBoxed(correct=2.0, wrong=0.0, no_boxed=-1.0)([r"\boxed{7}", r"\boxed{8}", "7"], answer=["7"] * 3) == [
        2.0,
        0.0,
        -1.0,
    ]


def test_think_format():
    f = ThinkFormat()
    completions = ["<think>4+3=7</think>The answer is 7.", "  <think>\nx\n</think>\n7", "<think>x</think>",
                   "<think></think>7", "7<think>x</think>7", "<think>a<think>b</think>7", "<think>x</think>7</think>",
                   "no tags", "x</think>7"]  # fmt: skip
    assert f(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert ThinkFormat(open_tag_in_prompt=True)(["x</think>7", "<think>x</think>7"]) == [1.0, 0.0]
    assert ThinkFormat("<reasoning>", "</reasoning>")(["<reasoning>x</reasoning>7"]) == [1.0]
    with pytest.raises(ValueError):
        ThinkFormat("<t>", "<t>")


def test_soft_overlong():
    f = SoftOverlong(max_completion_length=512, soft_cache_length=128)
    lengths = [0, 384, 385, 448, 512, 513, 10_000]
    assert f(completions=[""] * 7, completion_ids=[[0] * n for n in lengths]) == [
        0.0,
        0.0,
        -1 / 128,
        -0.5,
        -1.0,
        -1.0,
        -1.0,
    ]
    assert f(completions=["a"]) == [None]  # no token ids outside a trainer
    with pytest.raises(ValueError):
        SoftOverlong(max_completion_length=10, soft_cache_length=20)


# --------------------------------------------------------------------------------------------- cookbook
GOOD = "<start_working_out>16 - 3 - 4 = 9, 9 * 2 = 18<end_working_out><SOLUTION>18</SOLUTION>"


def test_cookbook_format_exact():
    f = CookbookFormatExact()
    completions = [GOOD, "  \n" + GOOD + " \n", GOOD + "\ntrailing line", "preamble " + GOOD, "<SOLUTION>18</SOLUTION>",
                   "<start_working_out><end_working_out><SOLUTION>18</SOLUTION>",
                   "<start_working_out>x<end_working_out><SOLUTION></SOLUTION>", "preamble\n" + GOOD]  # fmt: skip
    assert f(completions) == [3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 3.0]
    assert CookbookFormatExact(reasoning_start_in_prompt=True)([GOOD.replace("<start_working_out>", "")]) == [3.0]


def test_cookbook_format_approx():
    f = CookbookFormatApprox()
    assert f([GOOD, "nothing", GOOD + GOOD, "<SOLUTION>18</SOLUTION>"]) == [2.0, -2.0, -2.0, 0.0]
    assert CookbookFormatApprox(penalty=-1.0)(["<SOLUTION>18</SOLUTION>"]) == [-1.0]


def test_cookbook_answer_and_number():
    def wrap(x):
        return GOOD.replace("<SOLUTION>18</SOLUTION>", f"<SOLUTION>{x}</SOLUTION>")

    answer = CookbookAnswer()
    guesses = ["18", " 18 ", "19", "20", "15", "30", "eighteen", "18.0", "1e999"]
    assert answer([wrap(g) for g in guesses] + ["18"], answer=["18"] * 10) == [
        3.0, 1.5, 0.5, 0.25, 0.25, -1.0, -0.5, 0.5, -1.0, 0.0
    ]  # fmt: skip  # 18.0: not the same string, ratio 1 -> within 10% (as in the notebooks)
    assert answer([wrap("5")], answer=["0"]) == [-1.0]  # zero gold: wrong, not a crash
    assert answer([wrap(r"\frac{4}{3}")], answer=[r"\frac{4}{3}"]) == [3.0]

    number = CookbookNumber()
    guesses = ["18", "18.0", "$18", "It is 18 dollars", "1,018", "19", "-18", "no number"]
    assert number([wrap(g) for g in guesses] + ["18"], answer=["18"] * 9) == [1.5, 1.5, 1.5, 1.5, 0.0, 0.0, 0.0] + [
        0.0,
        0.0,
    ]
    assert number([wrap("-3")], answer=["-3"]) == [1.5]
    assert number([wrap("3")], answer=[r"\frac{4}{3}"]) == [None]


def test_cookbook_solution_agrees_with_the_notebook_regex():
    f = CookbookFormatExact()
    rs, re_, ss, se = (re.escape(t) for t in f.tags)
    notebook = re.compile(rf"^[\s]{{0,}}{rs}.+?{re_}.*?{ss}(.+?){se}[\s]{{0,}}$", flags=re.MULTILINE | re.DOTALL)
    rng = random.Random(0)
    noise = ["", "", " ", "\n", "\t", "a", "7", "\r\n", " \n ", "x\n", "\u00a0"]
    matched = 0
    for _ in range(20000):
        parts = [rng.choice(noise)]
        for _ in range(rng.randint(1, 3)):
            for tag in f.tags:
                if rng.random() < 0.85:
                    parts.append(tag)
                parts.append(rng.choice(noise))
                if rng.random() < 0.1:
                    parts.append(rng.choice(f.tags))
        if rng.random() < 0.3:
            rng.shuffle(parts)
        text = "".join(parts)
        m = notebook.search(text)
        assert f.solution(text) == (m.group(1) if m else None), repr(text)
        matched += m is not None
    assert matched > 3000
    started = time.perf_counter()  # the notebook regex takes ~40 s on this
    assert f(["\n" * 100_000 + "<SOLUTION>1</SOLUTION>", "<start_working_out>\n" * 20_000]) == [0.0, 0.0]
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------------------------------------- fuzz
FRAGMENTS = ["\\boxed{", "}", "{", "\\frac", "\\sqrt", "\\dfrac", "$", "$$", "\\(", "\\)", "\\[", "\\]", "^", "_",
             "\\text{", "\\left(", "\\right)", "\\infty", "\\pi", "-", "+", "=", ",", ".", "1", "18", "0", "9999", "\\\\",
             "\\", " ", "\n", "<think>", "</think>", "<SOLUTION>", "</SOLUTION>", "<start_working_out>",
             "<end_working_out>", "final answer is", "answer:", "%", "\\%", "\\!", "{,}", "é", "∞", "√", "½", "\u200b",
             "\x00", "🙂", "\\begin{pmatrix}", "&", "\\end{pmatrix}"]  # fmt: skip
ADVERSARIAL = [
    "", " ", "\\boxed{", "\\boxed{}", "\\boxed", "\\boxed{" * 3000, "{" * 5000 + "}" * 5000,
    "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "\\boxed{" + "1" * 10000 + "}", "1" * 10000, "-" + "9" * 10000,
    "\\boxed{" + "1," * 5000 + "1}", "x" * 200_000, "\\frac" * 5000, "\\sqrt" * 5000 + "2",
    "\\frac{" * 2000 + "1" + "}{2}" * 2000, "$" * 10001, "<think>" * 1000 + "</think>" * 1000,
    "<start_working_out>" + "a" * 50000 + "<end_working_out><SOLUTION>" + "1" * 10000 + "</SOLUTION>",
    "\\boxed{9^{9^{9}}}", "\\boxed{10^{100000000}}", "\\boxed{\\binom{100000}{50000}}", "\\boxed{100000!}",
    "\\boxed{(1+x)^{1000}}", "\\boxed{" + "(" * 300 + "x" + ")" * 300 + "}", "\\boxed{\\sum_{n=1}^{10^{9}} n}",
    "\\boxed{1e999999}", "<SOLUTION>1e999999</SOLUTION>", "<SOLUTION>nan</SOLUTION>", "<SOLUTION>inf</SOLUTION>",
    "\ud800\\boxed{\udfff}", "\\boxed{\\text{" + "a" * 10000 + "}}", "\n" * 100_000 + "<SOLUTION>1</SOLUTION>",
    "\\boxed{\\begin{pmatrix}" + "1&" * 500 + "1\\end{pmatrix}}",
]  # fmt: skip


def fuzz_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    corpus = list(ADVERSARIAL)
    alphabet = string.printable + "é∞√½🙂\u200b"
    while len(corpus) < n:
        if rng.random() < 0.3:
            corpus.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))))
        else:
            corpus.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 60))))
    return corpus


def test_fuzz_every_reward_never_raises():
    """3,000 random and adversarial completions through every reward, against four kinds of gold.

    math-verify's own timeouts bound the pathological ones; they are set to 1 s here (TRL's 10 s / 5 s
    would make this test take ~60 s, almost all of it in five adversarial strings).
    """
    corpus = fuzz_corpus()
    golds = ["18", r"\frac{4}{3}", "-5", r"(3, \frac{\pi}{2})"]
    answers = [golds[i % len(golds)] for i in range(len(corpus))]
    fast = {
        "accuracy": {"parsing_timeout": 1, "verify_timeout": 1},
        "binary_boxed": {"parsing_timeout": 1, "verify_timeout": 1},
        "boxed_accuracy": {"parsing_timeout": 1, "verify_timeout": 1},
    }
    for name in REWARD_REGISTRY:
        func = build_reward(name, fast.get(name))
        for kind, completions in (("conversational", [conv(c) for c in corpus]), ("plain", corpus[:200])):
            n = len(completions)
            rewards = func(
                prompts=[None] * n,
                completions=completions,
                completion_ids=[[0] * (len(c) % 3000) for c in corpus[:n]],
                answer=answers[:n],
            )
            assert len(rewards) == n, (name, kind)
            assert all(r is None or (isinstance(r, float) and r == r) for r in rewards), (name, kind)


# ------------------------------------------------------------------------------------------ near misses
# (gold, wrong answer): the gold's last significant digit changed, or a change past the 6th decimal place,
# which math-verify's rounding to 6 decimals calls equal.
NEAR_MISSES = [
    ("0.0000672", "0.0000673"),
    ("0.0000672", "0.00006721"),
    ("0.5", "0.5000001"),
    ("3.1415926", "3.1415927"),
    ("-0.0000001", "-0.0000002"),
    ("0.0000001", "0"),
    ("1234567.1234567", "1234567.1234568"),
]
NEAR_MISSES_AS_EXPRESSIONS = [("0.0000672", r"6.73\times10^{-5}"), ("0.5", r"\frac{1000001}{2000000}")]
# The same numbers written otherwise: still right.
NUMBERS_WRITTEN_OTHERWISE = [
    ("0.0000672", "0.00006720"),
    ("0.0000672", r"6.72\times10^{-5}"),
    ("0.5", r"\frac{1}{2}"),
    ("0.25", r"\frac14"),
    ("18", "18.0"),
    ("1000", "1,000"),
    (r"\frac43", "1.333333"),  # a fraction gold: math-verify's rounding decides, as before
]


@pytest.mark.parametrize("name", ["accuracy", "boxed_accuracy", "binary_boxed", "last_number", "cookbook_number"])
def test_a_change_in_the_last_digit_of_a_number_gold_is_wrong(name):
    reward = build_reward(name)
    wrap = (lambda a: f"<SOLUTION>{a}</SOLUTION>") if name.startswith("cookbook") else boxed
    cases = NEAR_MISSES + (
        NEAR_MISSES_AS_EXPRESSIONS if name in ("accuracy", "boxed_accuracy", "binary_boxed") else []
    )
    rewards = reward([conv(wrap(w)) for _, w in cases], answer=[g for g, _ in cases])
    paid = [case for case, r in zip(cases, rewards, strict=True) if r == reward.correct_reward]
    assert paid == []
    right = reward([conv(wrap(g)) for g, _ in cases], answer=[g for g, _ in cases])
    assert right == [reward.correct_reward] * len(cases)


@pytest.mark.parametrize("name", ["accuracy", "boxed_accuracy"])
def test_the_same_number_written_otherwise_is_still_right(name):
    reward = build_reward(name)
    cases = [c for c in NUMBERS_WRITTEN_OTHERWISE if name == "accuracy" or "times" not in c[1]]  # arithmetic in a box
    rewards = reward([conv(boxed(a)) for _, a in cases], answer=[g for g, _ in cases])
    assert rewards == [1.0] * len(cases)
