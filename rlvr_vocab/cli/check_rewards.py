r"""Check the configured rewards against the dataset's own gold answers, before spending GPU hours.

For every row, each answer-judging reward in ``reward.funcs`` (those with a ``correct_reward``) scores
completions written in the format it reads (``\boxed{}`` for most): one holding the row's gold
answer, which must score ``correct_reward``, and deterministically WRONG ones, which must not:
``wrong_answer`` (first number + 1, ...) and, for a plain-number gold, ``near_misses`` (the last digit
changed, or a change in the 7th decimal place, which math-verify's 6-decimal rounding would hide).
Format-only rewards are reported as means.

    rlvr-check-rewards dataset=gsm8k dataset.path=data/gsm8k/test.jsonl output_file=check.json
    rlvr-check-rewards reward=cookbook check_rewards.split=eval check_rewards.max_failures=20

Settings (``check_rewards.<key>`` or a top-level ``<key>``): ``split`` (train | eval, default train),
``max_failures`` (failures printed, default 10), ``limit`` (first N rows, default all); ``output_file``
writes the result as JSON. Exits with status 1 when any wrong answer scored as correct.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

import rlvr_vocab.config  # noqa: F401  (registers the structured-config schema with Hydra)
from rlvr_vocab.rewards.text import BOXED_TEMPLATE, to_number

BATCH_SIZE = 256  # rows per reward call

# Groups whose digits are not "the answer's numbers": \text{...} units/words and a unit's ^2.
_TEXT_GROUP_RE = re.compile(r"\\(?:text\w*|mbox|mathrm)\s*\{[^{}]*\}(?:\^\{?\d\}?)?")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


def wrong_answer(gold: str) -> str:
    r"""A wrong answer derived deterministically from a gold answer, written the same way.

    The first number outside ``\text{}`` gets +1 on its integer part (``\frac{4}{3}`` -> ``\frac{5}{3}``;
    ``1.0000001`` -> ``2.0000001``, as math-verify rounds to 6 decimals; the first, not the last,
    because ``\binom{5}{3}`` equals ``\binom{5}{2}``). An answer without such a number flips
    ``\infty``'s sign, or else becomes ``(gold)+1``.

    Example:
        >>> [wrong_answer(g) for g in ["18", r"\frac{4}{3}", "1,000", "0.5", r"5\text{ cm}^2", r"-\infty", "p - q"]]
        ['19', '\\frac{5}{3}', '2,000', '1.5', '6\\text{ cm}^2', '\\infty', '(p - q)+1']
    """
    gold = str(gold)
    masked = _TEXT_GROUP_RE.sub(lambda m: "#" * len(m.group(0)), gold)
    numbers = list(_NUMBER_RE.finditer(masked))
    if numbers:
        m = numbers[0]
        integer = m.group(0).split(".")[0]
        if len(integer) <= 1000:
            bumped = str(int(integer) + 1).zfill(len(integer))
        else:  # beyond Python's int/str limit: change the last digit instead
            bumped = integer[:-1] + str((int(integer[-1]) + 1) % 10)
        return gold[: m.start()] + bumped + gold[m.start() + len(integer) :]
    if "\\infty" in gold:
        return gold.replace("-\\infty", "\0").replace("\\infty", "-\\infty").replace("\0", "\\infty")
    return f"({gold})+1"


def near_misses(gold: str) -> list[str]:
    r"""Wrong answers a hair from a plain-number gold: its last digit changed, and a change in the 7th decimal.

    Both are wrong, and both are what rounding to 6 decimal places (math-verify's) would call equal;
    a gold that is not a plain number (``\frac{4}{3}``, ``p - q``) has none.

    Example:
        >>> near_misses("0.0000672"), near_misses("18"), near_misses("-0.5"), near_misses("1,000"), near_misses("x")
        (['0.0000673'], ['19', '18.0000001'], ['-0.6', '-0.5000001'], ['1,001', '1,000.0000001'], [])
    """
    gold = str(gold).strip()
    if to_number(gold) is None or not gold[-1:].isdigit():
        return []
    last = gold[:-1] + str((int(gold[-1]) + 1) % 10)
    decimals = len(gold.rsplit(".", 1)[1]) if "." in gold else 0
    if decimals >= 7:
        return [last]
    seventh = gold + ("" if decimals else ".") + "0" * (6 - decimals) + "1"
    return [last, seventh]


def _judges(func: Callable) -> bool:
    return getattr(func, "correct_reward", None) is not None


def _name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _call(func: Callable, rows: Sequence[Mapping], texts: Sequence[str]) -> list[float | None]:
    """Call a reward as TRL does: conversational completions plus every dataset column but the prompt."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
    prompts = [row.get("prompt") for row in rows]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    out = func(prompts=prompts, completions=completions, completion_ids=None, **columns)
    if len(out) != len(texts):
        raise ValueError(f"reward {_name(func)!r} returned {len(out)} rewards for {len(texts)} completions")
    return list(out)


def check_rewards(
    rows: Iterable[Mapping[str, Any]],
    reward_funcs: Sequence[Callable],
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Score gold and wrong answers through the rewards; counts, per-reward means and every failure.

    A row is ``skipped`` when no judging reward applies to it (all return None for the gold), e.g. an
    unparseable gold; otherwise its gold is correct when every applicable judging reward gives its
    ``correct_reward``, and it counts in ``wrong_scored_correct`` when any of them gives that to any of the
    row's wrong answers (``wrong_answer`` and ``near_misses``; ``wrong_answers`` counts them all).

    Example:
        >>> from rlvr_vocab.rewards import get_reward_funcs
        >>> funcs, weights = get_reward_funcs({"funcs": ["accuracy", "boxed_format"], "weights": [1.0, 0.2]})
        >>> result = check_rewards([{"answer": "18"}, {"answer": r"\\frac43"}, {"answer": ""}], funcs, weights)
        >>> {k: result[k] for k in ("gold_correct", "gold_total", "wrong_scored_correct", "skipped")}
        {'gold_correct': 2, 'gold_total': 2, 'wrong_scored_correct': 0, 'skipped': 1}
    """
    rows = [dict(row) for row in rows]
    funcs = list(reward_funcs)
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    judges = [f for f in funcs if _judges(f)]
    template = getattr(judges[0], "answer_template", BOXED_TEMPLATE) if judges else BOXED_TEMPLATE
    golds = [str(row.get("answer", "")) for row in rows]
    # every wrong answer of every row: (row index, wrong answer); each row has one or more
    wrongs = [(i, w) for i, g in enumerate(golds) for w in dict.fromkeys([wrong_answer(g), *near_misses(g)])]

    # scores[name] = (gold scores, one per row; wrong scores, one per entry of ``wrongs``)
    scores: dict[str, tuple[list, list]] = {}
    for func in funcs:
        tmpl = getattr(func, "answer_template", template) if _judges(func) else template
        gold_scores: list = []
        wrong_scores: list = []
        for start in range(0, len(rows), BATCH_SIZE):
            batch = rows[start : start + BATCH_SIZE]
            gold_scores += _call(func, batch, [tmpl.replace("{answer}", g) for g in golds[start : start + BATCH_SIZE]])
        for start in range(0, len(wrongs), BATCH_SIZE):
            batch = wrongs[start : start + BATCH_SIZE]
            wrong_scores += _call(func, [rows[i] for i, _ in batch], [tmpl.replace("{answer}", w) for _, w in batch])
        scores[_name(func)] = (gold_scores, wrong_scores)
    wrongs_of: list[list[int]] = [[] for _ in rows]  # row -> its entries in ``wrongs``
    for k, (i, _) in enumerate(wrongs):
        wrongs_of[i].append(k)

    failures: list[dict[str, Any]] = []
    per_reward = {
        _name(f): {"gold_correct": 0, "gold_total": 0, "wrong_scored_correct": 0, "skipped": 0} for f in judges
    }
    gold_correct = wrong_correct = skipped = 0
    for i, gold in enumerate(golds):
        applicable = [f for f in judges if scores[_name(f)][0][i] is not None]
        paid = set()  # entries of ``wrongs`` that some applicable judge scored as correct
        for f in judges:
            counts = per_reward[_name(f)]
            g = scores[_name(f)][0][i]
            if g is None:
                counts["skipped"] += 1
                continue
            counts["gold_total"] += 1
            counts["gold_correct"] += g == f.correct_reward
            if g != f.correct_reward:
                failures.append({"row": i, "kind": "gold_not_correct", "reward": _name(f), "answer": gold, "score": g})
            paid_here = [k for k in wrongs_of[i] if scores[_name(f)][1][k] == f.correct_reward]
            counts["wrong_scored_correct"] += bool(paid_here)
            paid.update(paid_here)
            failures += [
                {"row": i, "kind": "wrong_scored_correct", "reward": _name(f), "answer": gold, "wrong": wrongs[k][1]}
                for k in paid_here
            ]
        if not applicable:
            skipped += 1
            continue
        gold_correct += all(scores[_name(f)][0][i] == f.correct_reward for f in applicable)
        wrong_correct += bool(paid)

    def mean(values: list) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    def total(which: int) -> float | None:
        n = len(rows) if which == 0 else len(wrongs)
        weighted = [
            sum(w * (scores[_name(f)][which][i] or 0.0) for f, w in zip(funcs, weights, strict=True))
            for i in range(n)
            if any(scores[_name(f)][which][i] is not None for f in funcs)
        ]
        return sum(weighted) / len(weighted) if weighted else None

    return {
        "rows": len(rows),
        "wrong_answers": len(wrongs),
        "gold_correct": gold_correct,
        "gold_total": len(rows) - skipped,
        "wrong_scored_correct": wrong_correct,
        "skipped": skipped,
        "judging_rewards": [_name(f) for f in judges],
        "per_reward": per_reward,
        "means": {name: {"gold": mean(g), "wrong": mean(w)} for name, (g, w) in scores.items()},
        "weighted_total_mean": {"gold": total(0), "wrong": total(1)},
        "failures": failures,
    }


def format_summary(result: Mapping[str, Any], max_failures: int = 10) -> str:
    """The human-readable report printed by the CLI."""
    lines = []
    total = result["gold_total"]
    rate = f"{100 * result['gold_correct'] / total:.2f}%" if total else "n/a"
    lines.append(
        f"gold answers scored correct: {result['gold_correct']}/{total} ({rate}); "
        f"wrong answers scored correct: {result['wrong_scored_correct']}; skipped rows: {result['skipped']}"
    )
    if not result["judging_rewards"]:
        lines.append("no answer-judging reward in reward.funcs: only format rewards, nothing to check")
    for name, counts in result["per_reward"].items():
        lines.append(f"  {name}: {counts}")
    for name, m in result["means"].items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"  mean {name}: gold {fmt(m['gold'])}, wrong {fmt(m['wrong'])}")
    failures = result["failures"]
    if failures:
        lines.append(f"first {min(max_failures, len(failures))} of {len(failures)} failures:")
        lines += [f"  {json.dumps(f, ensure_ascii=False)}" for f in failures[:max_failures]]
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Load the configured dataset split and rewards, check them, print and optionally write the result."""
    from loguru import logger

    from rlvr_vocab.data import load_datasets
    from rlvr_vocab.rewards import get_reward_funcs

    split = cfg.check_rewards.split
    if split not in ("train", "eval"):
        raise ValueError(f"check_rewards.split={split!r}: choose train or eval.")
    limit = cfg.check_rewards.limit
    max_failures = cfg.check_rewards.max_failures

    funcs, weights = get_reward_funcs(cfg.reward)
    train, evaluation = load_datasets(cfg)
    dataset = train if split == "train" else evaluation
    if dataset is None:
        raise ValueError(
            f"check_rewards.split=eval but dataset {cfg.dataset.name!r} has no held-out split configured."
        )
    if limit is not None:
        dataset = dataset.select(range(min(int(limit), len(dataset))))
    started = time.perf_counter()
    result = check_rewards(dataset, funcs, weights)
    result.update(split=split, dataset=cfg.dataset.name, reward_funcs=[_name(f) for f in funcs], weights=list(weights))
    result["seconds"] = round(time.perf_counter() - started, 2)
    logger.info(f"checked {len(dataset)} {split} rows through {result['reward_funcs']} in {result['seconds']} s")
    print(format_summary(result, max_failures))
    output_file = cfg.output_file
    if output_file:
        path = Path(output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        logger.info(f"wrote {path}")
    return result


def check(cfg: DictConfig) -> None:
    """run(cfg), then exit with status 1 when any wrong answer scored as correct."""
    result = run(cfg)
    if result["wrong_scored_correct"]:
        sys.exit(1)


def main() -> None:
    """Console script ``rlvr-check-rewards`` (also ``python -m rlvr_vocab.cli.check_rewards``)."""
    from rlvr_vocab.cli import run_tool

    run_tool(check)


if __name__ == "__main__":
    main()
