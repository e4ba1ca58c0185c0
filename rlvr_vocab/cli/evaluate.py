"""rlvr-eval: accuracy of a model, a checkpoint, a LoRA adapter, or every checkpoint of a run, on a dataset split.

    # the configured model on GSM8K test (offline files), 200 problems, greedy pass@1
    rlvr-eval model=qwen3_0.6b dataset.path=data/gsm8k/train.jsonl \\
        dataset.eval_path=data/gsm8k/test.jsonl eval.max_samples=200 output_file=eval.json
    # every checkpoint-N of a run (a run folder as eval.model_path), plus 8 samples each for pass@8 / maj@8
    rlvr-eval experiment=reasoning eval.model_path=outputs/reasoning/<run> eval.num_samples=8
    # a LoRA adapter: the configured model= is the base
    rlvr-eval model=qwen3_0.6b eval.model_path=outputs/grpo/<run>/checkpoint-50

Scores: greedy ``pass@1``; with ``eval.num_samples=k`` (k > 1) also ``pass@k`` (a sampled completion is
right), ``maj@k`` (the completion carrying the most frequent final answer is right) and ``mean@k`` (mean
sampled accuracy); ``format_rate`` (share of greedy completions with a ``\\boxed{}`` answer) and
``mean_length`` (tokens). Right means the ``eval.reward`` reward of rlvr_vocab/rewards (default ``accuracy``:
math-verify on the boxed answer) reaches its ``correct_reward`` (1.0), with that reward's ``reward.kwargs``;
``eval.reward=last_number`` grades models that rarely box their answer (the quickstart's SmolLM2). A final
answer, for voting and in the records, is the last ``\\boxed{}``, else the last number. Several checkpoints
also give a markdown table and a PNG of accuracy over training steps, next to ``output_file`` (default: in
the run folder).
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from rlvr_vocab.config import ConfigError

# Defaults of the ``eval.*`` keys (the schema's EvalConfig once it is typed; a free-form dict until then).
EVAL_DEFAULTS: dict[str, Any] = {
    "model_path": None,  # hub id, model/checkpoint folder, LoRA adapter folder, or run folder (null: model=)
    "checkpoints": "auto",  # auto: every checkpoint-N of a run folder, else the one model | all | one
    "split": "eval",  # eval: the held-out split | train: the training split
    "max_samples": None,  # first N problems of the split (null: all, after dataset.max_eval_samples)
    "batch_size": 16,  # sequences per generate call (prompts x samples)
    "max_new_tokens": None,  # generated tokens per completion (null: training.max_completion_length)
    "num_samples": 1,  # k > 1: also k sampled completions per problem (pass@k, maj@k, mean@k)
    "reward": "accuracy",  # registry reward that decides correctness (right = its correct_reward, e.g. 1.0)
    "plot": True,  # several checkpoints: write the markdown table and the PNG
    "every_steps": 0,  # training: held-out eval every N optimizer steps (HeldOutEvalCallback; 0: off)
}


def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.eval`` over the defaults; an unknown key is a ConfigError with a suggestion."""
    given = OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") is not None else {}
    for key in given:
        if key not in EVAL_DEFAULTS:
            close = difflib.get_close_matches(key, EVAL_DEFAULTS, n=1)
            hint = f" Did you mean 'eval.{close[0]}'?" if close else ""
            raise ConfigError(f"eval.{key} is not an eval setting ({', '.join(EVAL_DEFAULTS)}).{hint}")
    settings = {**EVAL_DEFAULTS, **given}
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


# ------------------------------------------------------------------------------------------ what to evaluate
def eval_targets(model_path: str | None, checkpoints: str) -> list[tuple[str | None, int | None]]:
    """``(path, step)`` pairs to evaluate, by step; ``(None, None)`` is the configured model."""
    from rlvr_vocab.generation import CHECKPOINT_RE, find_checkpoints, is_model_dir, trained_step

    if model_path is None:
        if checkpoints == "all":
            raise ConfigError("eval.checkpoints=all needs eval.model_path=<run folder>.")
        return [(None, None)]
    path = Path(model_path)
    if checkpoints == "all" and CHECKPOINT_RE.match(path.name):
        path = path.parent  # a checkpoint of the run: evaluate the whole run
    found = find_checkpoints(path) if checkpoints != "one" else []
    if checkpoints == "all" and not found:
        raise ConfigError(f"eval.checkpoints=all: no checkpoint-N folder with a model under {str(path)!r}.")
    targets = [(str(p), step) for step, p in found]
    final = trained_step(path) if path.is_dir() else None
    if not found or (is_model_dir(path) and final not in {s for _, s in targets}):
        targets.append((str(path) if path.exists() else model_path, final))  # the run's final model, or a hub id
    if found:
        logger.info(f"Evaluating {len(targets)} models of {path}: steps {[s for _, s in targets]}")
    return sorted(targets, key=lambda t: (t[1] is None, t[1] or 0))


def eval_rows(cfg: DictConfig, settings: dict[str, Any]):
    """The problems: columns prompt / problem / answer of the chosen split, cut to ``eval.max_samples``."""
    from rlvr_vocab.data import load_datasets

    return select_rows(cfg, settings, *load_datasets(cfg))


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
    from rlvr_vocab.data import last_boxed
    from rlvr_vocab.generation import extract_answer

    answer = c.answer if c.answer is not None else ""
    return {
        "completion": c.text,
        "answer_text": c.answer,
        "boxed": last_boxed(answer),
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
    from rlvr_vocab.generation import generate, majority, sampling_kwargs

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


# ------------------------------------------------------------------------------------------ reports
def _columns(num_samples: int) -> list[str]:
    sampled = [f"pass@{num_samples}", f"maj@{num_samples}", f"mean@{num_samples}"] if num_samples > 1 else []
    return ["pass@1", *sampled, "format_rate", "mean_length"]


def markdown_table(results: list[dict[str, Any]], num_samples: int) -> str:
    """One row per evaluated model: name, step and the summary metrics.

    Example:
        >>> print(markdown_table([{"model": "checkpoint-2", "step": 2, "summary": {"pass@1": 0.25,
        ...       "format_rate": 1.0, "mean_length": 12.0}}], 1))
        | model | step | pass@1 | format_rate | mean_length |
        |---|---|---|---|---|
        | checkpoint-2 | 2 | 0.250 | 1.000 | 12.0 |
    """
    cols = _columns(num_samples)
    lines = ["| model | step | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in results:
        cells = [f"{r['summary'][c]:.1f}" if c == "mean_length" else f"{r['summary'][c]:.3f}" for c in cols]
        step = "" if r["step"] is None else str(r["step"])
        lines.append(f"| {r['model']} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(results: list[dict[str, Any]], num_samples: int, path: Path, title: str = "") -> Path | None:
    """PNG of accuracy over training steps (pass@1, and pass@k / maj@k when sampled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = [r for r in results if r["step"] is not None]
    if not points:
        return None
    metrics = ["pass@1"] + ([f"pass@{num_samples}", f"maj@{num_samples}"] if num_samples > 1 else [])
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in metrics:
        ax.plot([r["step"] for r in points], [r["summary"][metric] for r in points], marker="o", label=metric)
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _report_stem(cfg: DictConfig, settings: dict[str, Any], many: bool) -> Path | None:
    if cfg.output_file:
        return Path(cfg.output_file).with_suffix("")
    if many:  # a whole run: next to its checkpoints
        run = Path(settings["model_path"])
        run = run.parent if run.name.startswith("checkpoint-") else run
        return run / f"eval_{cfg.dataset.name}_{settings['split']}"
    return None


# ------------------------------------------------------------------------------------------ entry point
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as configured; returns ``{"settings", "results": [{"model", "step", "summary", "records"}]}``."""
    from rlvr_vocab.generation import load_policy

    settings = eval_settings(cfg)
    targets = eval_targets(settings["model_path"], settings["checkpoints"])  # path errors before any load
    rows = eval_rows(cfg, settings)
    reward = correctness_reward(cfg, settings["reward"])
    results = []
    for path, step in targets:
        name = Path(path).name if path and Path(path).exists() else (path or cfg.model.name_or_path)
        start = time.time()
        model, tokenizer = load_policy(cfg, path)
        summary, records = evaluate_model(
            model, tokenizer, rows, settings, cfg, span_reward(reward, model, tokenizer, rows), desc=name
        )
        summary["seconds"] = round(time.time() - start, 1)
        logger.info(f"{name} (step {step}): " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if "@" in k))
        results.append({"model": name, "path": path, "step": step, "summary": summary, "records": records})
        del model
    report = {
        "settings": {**settings, "dataset": cfg.dataset.name, "model": cfg.model.name_or_path, "seed": cfg.seed},
        "results": results,
    }
    stem = _report_stem(cfg, settings, many=len(results) > 1)
    table = markdown_table(results, settings["num_samples"])
    print(table)
    if stem is not None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        json_path = Path(cfg.output_file) if cfg.output_file else stem.with_suffix(".json")
        json_path.write_text(json.dumps(report, indent=1))
        written = [json_path]
        if len(results) > 1 and settings["plot"]:
            stem.with_suffix(".md").write_text(table + "\n")
            written.append(stem.with_suffix(".md"))
            title = f"{cfg.dataset.name} {settings['split']} ({len(rows)} problems)"
            png = plot_accuracy(results, settings["num_samples"], stem.with_suffix(".png"), title)
            written += [png] if png else []
        logger.info("Wrote " + ", ".join(str(p) for p in written))
    return report


def main() -> None:
    """Console script ``rlvr-eval``."""
    from rlvr_vocab.cli import run_tool

    run_tool(evaluate)


if __name__ == "__main__":
    main()
