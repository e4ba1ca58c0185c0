"""Evaluation as a library: what rlvr-eval, rlvr-infer and the held-out callback of training share.

``eval_settings`` reads ``eval.*``; ``select_rows`` picks the problems; ``correctness_reward`` builds the
registry reward that decides right or wrong (``eval.reward``, default ``accuracy``); ``evaluate_model`` runs
greedy (and with ``eval.num_samples=k`` sampled) generation and ``summarize`` turns the per-problem records
into ``pass@1``, ``pass@k``, ``maj@k``, ``mean@k``, ``format_rate`` and ``mean_length``. ``extract_answer``,
``answer_key`` and ``majority`` give a completion's final answer and the vote among samples.
rlvr_vocab/cli/evaluate.py adds what to evaluate (a run's checkpoints) and the reports.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlvr_vocab.config import ConfigError


# ------------------------------------------------------------------------------------------ settings and rows
def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.eval`` as a dict, ``max_new_tokens`` resolved; a value out of range is a ConfigError naming the key.

    (An unknown ``eval.*`` key never gets here: the schema's EvalConfig makes Hydra refuse it.)
    """
    settings = OmegaConf.to_container(cfg.eval, resolve=True)
    if settings["max_new_tokens"] is None:
        settings["max_new_tokens"] = cfg.training.max_completion_length
    if settings["checkpoints"] not in ("auto", "all", "one"):
        raise ConfigError(f"eval.checkpoints={settings['checkpoints']!r}: choose auto, all or one.")
    if settings["split"] not in ("eval", "train"):
        raise ConfigError(f"eval.split={settings['split']!r}: choose eval (the held-out split) or train.")
    for key in ("batch_size", "max_new_tokens", "num_samples"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise ConfigError(f"eval.{key}={settings[key]!r} must be a whole number >= 1.")
    if not isinstance(settings["every_steps"], int) or settings["every_steps"] < 0:
        raise ConfigError(f"eval.every_steps={settings['every_steps']!r} must be a whole number >= 0 (0: off).")
    return settings


def select_rows(cfg: DictConfig, settings: dict[str, Any], train, held_out):
    """``eval.split`` of already loaded (train, held-out) datasets, cut to ``eval.max_samples``."""
    rows = train if settings["split"] == "train" else held_out
    if rows is None:
        raise ConfigError(
            f"dataset {cfg.dataset.name!r} has no held-out split: set dataset.eval_path (or dataset.eval_split), "
            "or evaluate the training split with eval.split=train."
        )
    if settings["max_samples"] is not None:
        rows = rows.select(range(min(settings["max_samples"], len(rows))))
    return rows


# ------------------------------------------------------------------------------------------ scoring
def correctness_reward(cfg: DictConfig, name: str = "accuracy"):
    """The registry reward ``name`` (default ``accuracy``) with this config's ``reward.kwargs.<name>`` settings."""
    from rlvr_vocab.rewards.registry import build_reward

    kwargs = OmegaConf.to_container(cfg.reward.kwargs, resolve=True) or {}
    try:
        return build_reward(name, kwargs.get(name))
    except ValueError as err:
        raise ConfigError(f"eval.reward={name!r}: {err}") from err


def _score(reward, completions: list, golds: list[str]) -> list[bool]:
    """Right or wrong per completion: the reward reaches its ``correct_reward`` (1.0 for accuracy).

    ``completions``: texts, or generation.Completion objects; with a thinking span the reward judges each
    Completion's answer after the span (``Completion.answer``).
    """
    if not completions:
        return []
    texts = [c if isinstance(c, str) else c.text for c in completions]
    messages = [[{"role": "assistant", "content": t}] for t in texts]
    extra = {}
    if any(getattr(c, "span", None) is not None for c in completions):
        extra = {
            "completion_answer": [c.answer for c in completions],
            "completion_span": [c.span for c in completions],
        }
    scores = reward(messages, answer=golds, **extra)
    right = getattr(reward, "correct_reward", 1.0)
    return [bool(s is not None and s >= right) for s in scores]


def span_reward(reward, model, tokenizer, rows):
    """The correctness reward for this model: judging only the answer after the span when it has span tags."""
    from rlvr_vocab.rewards.registry import for_span
    from rlvr_vocab.thinking import prompt_ends_inside

    tags = getattr(model, "span_tags", None)
    if tags is None:
        return reward
    opens = prompt_ends_inside(tokenizer, tags, rows[0]["prompt"]) if len(rows) else False
    return for_span([reward], tags.open_tag, tags.close_tag, opens)[0]


def _record(c) -> dict[str, Any]:
    """The per-completion fields of a record: its answer (after the span), the box in it, the span."""
    from rlvr_vocab.rewards.text import last_boxed

    answer = c.answer if c.answer is not None else ""
    return {
        "completion": c.text,
        "answer_text": c.answer,
        "boxed": last_boxed(answer) or None,  # as the boxed_format reward: an empty box is no answer
        "extracted": extract_answer(answer),
        "num_tokens": c.num_tokens,
        "think_tokens": c.span.think_tokens if c.span is not None else 0,
        "closed_span": c.span.closed if c.span is not None and c.span.used else None,
        "completion_ids": c.ids,
    }


def summarize(records: list[dict[str, Any]], num_samples: int) -> dict[str, Any]:
    """Aggregate per-problem records into the summary metrics.

    Example:
        >>> recs = [{"correct": True, "boxed": "1", "num_tokens": 4, "truncated": False},
        ...         {"correct": False, "boxed": None, "num_tokens": 8, "truncated": True}]
        >>> s = summarize(recs, 1)
        >>> s["pass@1"], s["format_rate"], s["mean_length"], s["truncated_rate"]
        (0.5, 0.5, 6.0, 0.5)
    """
    n = max(len(records), 1)
    summary: dict[str, Any] = {
        "num_problems": len(records),
        "pass@1": sum(r["correct"] for r in records) / n,
        "format_rate": sum(r["boxed"] is not None for r in records) / n,
        "mean_length": sum(r["num_tokens"] for r in records) / n,
        "truncated_rate": sum(r["truncated"] for r in records) / n,
    }
    if any(r.get("closed_span") is not None for r in records):  # a thinking span: closed, and answered after it
        summary["closed_rate"] = sum(bool(r.get("closed_span")) for r in records) / n
        summary["closed_boxed_rate"] = sum(bool(r.get("closed_span")) and r["boxed"] is not None for r in records) / n
        # closed, and an answer after it (a box or a number): what a last_number-judged experiment counts as answered
        summary["closed_answered_rate"] = (
            sum(bool(r.get("closed_span")) and r.get("extracted") is not None for r in records) / n
        )
        summary["think_length"] = sum(r.get("think_tokens", 0) for r in records) / n
    if num_samples > 1:
        k = num_samples
        samples = [s for r in records for s in r["samples"]]
        summary[f"pass@{k}"] = sum(any(s["correct"] for s in r["samples"]) for r in records) / n
        summary[f"maj@{k}"] = sum(r["majority_correct"] for r in records) / n
        summary[f"mean@{k}"] = sum(s["correct"] for s in samples) / max(len(samples), 1)
        summary["sampled_format_rate"] = sum(s["boxed"] is not None for s in samples) / max(len(samples), 1)
        summary["sampled_mean_length"] = sum(s["num_tokens"] for s in samples) / max(len(samples), 1)
    return summary


def evaluate_model(
    model,
    tokenizer,
    rows,
    settings: dict[str, Any],
    cfg: DictConfig,
    reward,
    desc: str = "eval",
    progress: bool = True,
):
    """(summary, per-problem records) of one model on ``rows``."""
    from rlvr_vocab.generation import generate, sampling_kwargs

    prompts, golds = list(rows["prompt"]), list(rows["answer"])
    common = {
        "max_new_tokens": settings["max_new_tokens"],
        "batch_size": settings["batch_size"],
        "seed": cfg.seed,
        "progress": progress,
        "tags": getattr(model, "span_tags", None),
    }
    greedy = generate(model, tokenizer, prompts, desc=f"{desc} greedy", **common)
    correct = _score(reward, [c[0] for c in greedy], golds)
    records = []
    for i, (completion, ok) in enumerate(zip(greedy, correct, strict=True)):
        c = completion[0]
        records.append(
            {
                "index": i,
                "problem": rows[i]["problem"],
                "answer": golds[i],
                **_record(c),
                "correct": ok,
                "truncated": c.truncated,
            }
        )
    k = settings["num_samples"]
    if k > 1:
        sampled = generate(
            model, tokenizer, prompts, num_samples=k, do_sample=True, sampling=sampling_kwargs(cfg.model),
            desc=f"{desc} sampled x{k}", **common,
        )  # fmt: skip
        flat_ok = _score(reward, [s for group in sampled for s in group], [g for g in golds for _ in range(k)])
        for i, group in enumerate(sampled):
            oks = flat_ok[i * k : (i + 1) * k]
            samples = [{**_record(s), "correct": ok} for s, ok in zip(group, oks, strict=True)]
            vote = majority([s["extracted"] for s in samples])
            records[i]["samples"] = samples
            records[i]["majority"] = samples[vote]["extracted"] if vote is not None else None
            records[i]["majority_correct"] = vote is not None and samples[vote]["correct"]
    return summarize(records, k), records


# ------------------------------------------------------------------------------------------ answers
def extract_answer(text: str) -> str | None:
    r"""The final answer of a completion: the last ``\boxed{}``, else the last number written, else None.

    Example:
        >>> extract_answer("so \\boxed{7} and 8"), extract_answer("3 + 4 = 7."), extract_answer("no idea")
        ('7', '7', None)
    """
    from rlvr_vocab.rewards.text import last_boxed, last_number

    boxed = last_boxed(text)
    if boxed:
        return boxed
    number = last_number(text)
    if number is None:
        return None
    return str(number.numerator) if number.denominator == 1 else str(float(number))


def answer_key(answer: str | None) -> str | None:
    r"""A canonical form of an extracted answer for voting: numbers by value, other text without spaces.

    Example:
        >>> answer_key("1,000"), answer_key("\\$18.00"), answer_key("\\frac{1}{2}"), answer_key(None)
        ('1000', '18', '\\frac{1}{2}', None)
    """
    from rlvr_vocab.rewards.text import to_number

    if answer is None:
        return None
    number = to_number(answer)
    if number is not None:
        return str(number.numerator) if number.denominator == 1 else f"{number.numerator}/{number.denominator}"
    key = re.sub(r"\s+", "", answer).replace("\\!", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return key or None


def majority(answers: list[str | None]) -> int | None:
    """Index of a completion carrying the most frequent answer (ties: the earliest); None if none answered.

    Example:
        >>> majority(["3", None, "4", "4.0", "3"])  # 3 and 4 tie twice each; 3 came first
        0
        >>> majority([None, None]) is None
        True
    """
    keys = [answer_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)
