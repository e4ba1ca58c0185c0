r"""Check the configured rewards against the dataset's own gold answers, before spending GPU hours.

For every row, each answer-judging reward in ``reward.funcs`` (those with a ``correct_reward``) scores
two completions written in the format it reads (``\boxed{}`` for most): one holding the row's gold
answer, which must score ``correct_reward``, and one holding a deterministically WRONG answer
(``wrong_answer``: last number + 1, ...), which must not. Format-only rewards are reported as means.

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
from rlvr_vocab.rewards.text import BOXED_TEMPLATE

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
    ``correct_reward``, and its wrong answer ``scored correct`` when any of them gives it.

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
    wrongs = [wrong_answer(g) for g in golds]

    # scores[name] = (gold scores, wrong scores), one per row
    scores: dict[str, tuple[list, list]] = {}
    for func in funcs:
        tmpl = getattr(func, "answer_template", template) if _judges(func) else template
        gold_scores: list = []
        wrong_scores: list = []
        for start in range(0, len(rows), BATCH_SIZE):
            batch = rows[start : start + BATCH_SIZE]
            gold_scores += _call(func, batch, [tmpl.replace("{answer}", g) for g in golds[start : start + BATCH_SIZE]])
            wrong_scores += _call(
                func, batch, [tmpl.replace("{answer}", w) for w in wrongs[start : start + BATCH_SIZE]]
            )
        scores[_name(func)] = (gold_scores, wrong_scores)

    failures: list[dict[str, Any]] = []
    per_reward = {
        _name(f): {"gold_correct": 0, "gold_total": 0, "wrong_scored_correct": 0, "skipped": 0} for f in judges
    }
    gold_correct = wrong_correct = skipped = 0
    for i, (gold, wrong) in enumerate(zip(golds, wrongs, strict=True)):
        applicable = [f for f in judges if scores[_name(f)][0][i] is not None]
        for f in judges:
            counts = per_reward[_name(f)]
            g, w = scores[_name(f)][0][i], scores[_name(f)][1][i]
            if g is None:
                counts["skipped"] += 1
                continue
            counts["gold_total"] += 1
            counts["gold_correct"] += g == f.correct_reward
            counts["wrong_scored_correct"] += w == f.correct_reward
            if g != f.correct_reward:
                failures.append({"row": i, "kind": "gold_not_correct", "reward": _name(f), "answer": gold, "score": g})
            if w == f.correct_reward:
                failures.append(
                    {"row": i, "kind": "wrong_scored_correct", "reward": _name(f), "answer": gold, "wrong": wrong}
                )
        if not applicable:
            skipped += 1
            continue
        gold_correct += all(scores[_name(f)][0][i] == f.correct_reward for f in applicable)
        wrong_correct += any(scores[_name(f)][1][i] == f.correct_reward for f in applicable)

    def mean(values: list) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    def total(which: int) -> float | None:
        per_row = [
            [scores[_name(f)][which][i] for f in funcs if scores[_name(f)][which][i] is not None]
            for i in range(len(rows))
        ]
        weighted = [
            sum(w * (scores[_name(f)][which][i] or 0.0) for f, w in zip(funcs, weights, strict=True))
            for i, present in enumerate(per_row)
            if present
        ]
        return sum(weighted) / len(weighted) if weighted else None

    return {
        "rows": len(rows),
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


def _setting(cfg: DictConfig, key: str, default: Any) -> Any:
    """``check_rewards.<key>`` if set, else a top-level ``<key>``, else the default."""
    group = cfg.get("check_rewards") or {}
    value = group.get(key) if hasattr(group, "get") else None
    if value is None:
        value = cfg.get(key)
    return default if value is None else value


def run(cfg: DictConfig) -> dict[str, Any]:
    """Load the configured dataset split and rewards, check them, print and optionally write the result."""
    from loguru import logger

    from rlvr_vocab.data import load_datasets
    from rlvr_vocab.rewards import get_reward_funcs

    split = _setting(cfg, "split", "train")
    if split not in ("train", "eval"):
        raise ValueError(f"check_rewards.split={split!r}: choose train or eval.")
    limit = _setting(cfg, "limit", None)
    max_failures = int(_setting(cfg, "max_failures", 10))

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
    output_file = _setting(cfg, "output_file", None)
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
