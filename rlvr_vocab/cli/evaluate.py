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

import json
import time
from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig

from rlvr_vocab.checkpoints import checkpoint_step
from rlvr_vocab.config import ConfigError
from rlvr_vocab.evaluation import correctness_reward, eval_settings, evaluate_model, select_rows, span_reward


# ------------------------------------------------------------------------------------------ what to evaluate
def eval_targets(model_path: str | None, checkpoints: str) -> list[tuple[str | None, int | None]]:
    """``(path, step)`` pairs to evaluate, by step; ``(None, None)`` is the configured model."""
    from rlvr_vocab.checkpoints import find_checkpoints, is_model_dir, trained_step

    if model_path is None:
        if checkpoints == "all":
            raise ConfigError("eval.checkpoints=all needs eval.model_path=<run folder>.")
        return [(None, None)]
    path = Path(model_path)
    if checkpoints == "all" and checkpoint_step(path) is not None:
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
        run = run.parent if checkpoint_step(run) is not None else run
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
