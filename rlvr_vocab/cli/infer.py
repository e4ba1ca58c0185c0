"""rlvr-infer: answer math questions with a model, a checkpoint, a reasoning-vocab checkpoint or a LoRA adapter.

    rlvr-infer model=tiny question="What is 2 + 3?"                                  # one question
    rlvr-infer eval.model_path=outputs/quickstart/<run> \\
        input_file=questions.jsonl output_file=answers.jsonl                         # a batch
    rlvr-infer eval.model_path=outputs/quickstart/<run>                              # interactive (a terminal)

The question goes through the same prompt as in training (``dataset.system_prompt`` and
``dataset.prompt_template``). Generation, shared with rlvr-eval: ``eval.model_path`` (what to load; null: the
configured ``model=``), ``eval.max_new_tokens`` (null: ``training.max_completion_length``), ``eval.num_samples``
(1: greedy; k > 1: k sampled completions and their majority answer), ``eval.batch_size``, and the sampling
settings of ``model.generation_kwargs`` (``temperature``, ``top_p``, ``top_k``).

``input_file`` is jsonl with a ``question`` field per line (other fields are kept; a gold ``answer`` is kept as
``gold``); every output line adds ``completion`` and the extracted ``answer`` (the last ``\\boxed{}``, else
the last number written).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from loguru import logger
from omegaconf import DictConfig

from rlvr_vocab.config import ConfigError


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file, each with a ``question`` (a gold ``answer`` is renamed ``gold``)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"input_file={str(path)!r} line {n} is not JSON: {err}") from err
        if isinstance(row, str):
            row = {"question": row}
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise ConfigError(f"input_file={str(path)!r} line {n} has no 'question' string: {line[:100]}")
        if "answer" in row:
            row["gold"] = row.pop("answer")
        rows.append(row)
    if not rows:
        raise ConfigError(f"input_file={str(path)!r} holds no question.")
    return rows


def answer_questions(model, tokenizer, rows: list[dict[str, Any]], cfg: DictConfig, settings: dict[str, Any]):
    """Each row plus ``completion`` and ``answer``; with ``eval.num_samples=k`` also ``completions``/``answers``."""
    from rlvr_vocab.data import build_prompt
    from rlvr_vocab.evaluation import extract_answer, majority
    from rlvr_vocab.generation import generate, sampling_kwargs

    k = settings["num_samples"]
    outputs = generate(
        model,
        tokenizer,
        [build_prompt(row["question"], cfg.dataset) for row in rows],
        max_new_tokens=settings["max_new_tokens"],
        num_samples=k,
        do_sample=k > 1,
        sampling=sampling_kwargs(cfg.model),
        batch_size=settings["batch_size"],
        seed=cfg.seed,
        progress=len(rows) > 1,
    )
    results = []
    for row, completions in zip(rows, outputs, strict=True):
        answers = [extract_answer(c.text) for c in completions]
        best = majority(answers) if k > 1 else 0
        chosen = completions[best if best is not None else 0]
        out = {**row, "completion": chosen.text, "answer": answers[best] if best is not None else None}
        out["num_tokens"] = chosen.num_tokens
        if k > 1:
            out["completions"] = [c.text for c in completions]
            out["answers"] = answers
        results.append(out)
    return results


def _show(result: dict[str, Any], out: TextIO) -> None:
    print(result["completion"], file=out)
    print(f"answer: {result['answer']}", file=out)


def interactive(model, tokenizer, cfg: DictConfig, settings: dict[str, Any], stream: TextIO | None = None, out=None):
    """Ask and answer until an empty input, ``exit``/``quit`` or end of input; returns the answered records."""
    out = out or sys.stdout
    answered = []
    print("Type a question (exit, quit or Ctrl-D to stop).", file=out)
    while True:
        try:
            line = input("question> ") if stream is None else stream.readline()
        except EOFError:
            break
        if stream is not None and not line:
            break
        line = line.strip()
        if line in ("exit", "quit"):
            break
        if not line:
            continue
        result = answer_questions(model, tokenizer, [{"question": line}], cfg, settings)[0]
        _show(result, out)
        answered.append(result)
    return answered


def infer(cfg: DictConfig, stream: TextIO | None = None) -> list[dict[str, Any]]:
    """Answer ``question``, the questions of ``input_file``, or (with a terminal) typed questions."""
    from rlvr_vocab.evaluation import eval_settings
    from rlvr_vocab.generation import load_policy

    settings = eval_settings(cfg)
    question, input_file = cfg.get("question"), cfg.get("input_file")
    if question and input_file:
        raise ConfigError("Give either question=... or input_file=..., not both.")
    rows = [{"question": str(question)}] if question else read_questions(input_file) if input_file else None
    if rows is None and stream is None and not sys.stdin.isatty():
        raise ConfigError(
            "rlvr-infer needs a question: question='...', "
            "input_file=questions.jsonl, or run it in a terminal to type questions."
        )
    model, tokenizer = load_policy(cfg, settings["model_path"])
    if rows is None:
        return interactive(model, tokenizer, cfg, settings, stream=stream)
    results = answer_questions(model, tokenizer, rows, cfg, settings)
    if cfg.output_file:
        Path(cfg.output_file).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.output_file, "w") as f:
            for result in results:
                f.write(json.dumps(result) + "\n")
        logger.info(f"Wrote {len(results)} answers to {cfg.output_file}")
    elif question:
        _show(results[0], sys.stdout)
    else:
        for result in results:
            print(json.dumps(result))
    return results


def main() -> None:
    """Console script ``rlvr-infer``."""
    from rlvr_vocab.cli import run_tool

    run_tool(infer)


if __name__ == "__main__":
    main()
