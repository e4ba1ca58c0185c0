"""Learning curve of a run: held-out greedy accuracy (``eval.every_steps``) against training time and step.

Reads ``<run>/metrics.jsonl`` (written by every training run), prints a markdown table and, with ``--json``,
writes the curve. Time is seconds since training began in that process (``heldout/train_seconds``: sampling,
training, checkpoints and the held-out evals themselves; model loading is before it).

    python grpo_train.py experiment=addsub output_dir=outputs/addsub/run1
    python -m bench.learning_curve outputs/addsub/run1 --target 0.6 --json bench/results/addsub.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_curve(run_dir: Path) -> dict:
    """The run's held-out records and per-step training rewards, by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run's output folder?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    heldout = [r for r in records if "heldout/pass@1" in r]
    if not heldout:
        raise ValueError(f"{path} has no held-out records: train with eval.every_steps=N (N > 0).")
    steps = [r for r in records if "reward" in r and "train_runtime" not in r]
    return {"heldout": heldout, "steps": steps}


def summarize(curve: dict, target: float | None) -> dict:
    """Rows (step, seconds, pass@1, format rate, mean training reward since the previous row) and the first
    step/time at which pass@1 reached ``target``.

    Example:
        >>> curve = {"heldout": [{"step": 0, "heldout/pass@1": 0.0, "heldout/format_rate": 0.0, "heldout/train_seconds": 1},
        ...                      {"step": 2, "heldout/pass@1": 0.7, "heldout/format_rate": 1.0, "heldout/train_seconds": 9}],
        ...          "steps": [{"step": 1, "reward": 0.2}, {"step": 2, "reward": 0.6}]}
        >>> s = summarize(curve, 0.6)
        >>> s["rows"][1]["train_reward"], s["reached"]
        (0.4, {'step': 2, 'seconds': 9.0, 'pass@1': 0.7})
    """
    rows, previous = [], -1
    for r in curve["heldout"]:
        window = [s["reward"] for s in curve["steps"] if previous < s["step"] <= r["step"]]
        rows.append(
            {
                "step": r["step"],
                "seconds": round(float(r["heldout/train_seconds"]), 1),
                "pass@1": r["heldout/pass@1"],
                "format_rate": r["heldout/format_rate"],
                "train_reward": round(sum(window) / len(window), 3) if window else None,
            }
        )
        previous = r["step"]
    reached = None
    if target is not None:
        hit = next((row for row in rows if row["pass@1"] >= target), None)
        reached = hit and {"step": hit["step"], "seconds": hit["seconds"], "pass@1": hit["pass@1"]}
    step_times = [
        b["time"] - a["time"] for a, b in zip(curve["steps"][:-1], curve["steps"][1:], strict=True) if "time" in a
    ]
    return {
        "rows": rows,
        "target": target,
        "reached": reached,
        "best_pass@1": max(row["pass@1"] for row in rows),
        "median_step_seconds": sorted(step_times)[len(step_times) // 2] if step_times else None,
    }


def markdown(summary: dict) -> str:
    lines = ["| step | train s | held-out pass@1 | boxed rate | train reward |", "|---|---|---|---|---|"]
    for row in summary["rows"]:
        reward = "" if row["train_reward"] is None else f"{row['train_reward']:.3f}"
        lines.append(
            f"| {row['step']} | {row['seconds']:.0f} | {row['pass@1']:.3f} | {row['format_rate']:.3f} | {reward} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a training run's output folder")
    parser.add_argument("--target", type=float, default=None, help="report the first eval at or above this pass@1")
    parser.add_argument("--json", type=Path, default=None, help="write the curve here")
    args = parser.parse_args(argv)
    summary = summarize(read_curve(args.run_dir), args.target)
    print(markdown(summary))
    if summary["median_step_seconds"] is not None:
        print(f"median step: {summary['median_step_seconds']:.2f} s (metrics.jsonl times, held-out evals included)")
    if args.target is not None:
        hit = summary["reached"]
        print(
            f"target pass@1 >= {args.target}: "
            + (f"step {hit['step']}, {hit['seconds']:.0f} s" if hit else "not reached")
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"run_dir": str(args.run_dir), **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
