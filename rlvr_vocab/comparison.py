"""Compare the arms of an experiment from its run dirs alone: statistics over seeds, differences, curves.

What ``rlvr-compare`` (cli/compare.py) does, as functions:

* :func:`find_runs` reads each run dir (``config.yaml``, ``metrics.jsonl``, Hydra's ``.hydra/overrides.yaml``)
  and a sweep dir's record of the multirun (``multirun.yaml``: which keys the sweep varied).
* :func:`group_runs` puts runs into arms by the ``by`` keys (default: the swept keys but ``seed``; for plain
  run dirs, ``model.reasoning_vocab_size``) and refuses runs whose resolved configs differ in any other key
  (``seed``, output names and paths excepted): a comparison must not differ in more than its variable.
* :func:`run_metrics` reduces one run to numbers: final held-out pass@1, the area under the held-out curve,
  steps to a target accuracy, and the end-of-training reward, reasoning-token fraction inside spans, think
  length and closed-span fraction.
* :func:`compare` gives per arm the mean and a 95% bootstrap CI over seeds, and per arm against the baseline
  the difference of means with its CI (paired by seed when both arms ran the same seeds) and the probability
  of improvement P(X > Y) (rliable's definition; ties count half) with its CI.
* :func:`write_report` writes ``compare.json``, ``compare.md`` and PNG curves per arm with 95% bands.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Keys that may differ between the runs of one comparison: replicate seeds, output names and paths.
IGNORED_KEYS = ("seed", "output_dir", "output_file", "exp_name", "logging.group", "paths.")
DEFAULT_BY = ("model.reasoning_vocab_size",)
HELDOUT = "heldout/pass@1"
# End-of-training metrics (mean over the last `tail` fraction of logged steps), as logged by the trainer.
TAIL_METRICS = {
    "train_reward": "reward",
    "reasoning_span_fraction": "reasoning/span_token_fraction",
    "think_length": "think/length",
    "closed_fraction": "think/closed_fraction",
    "completion_length": "completions/mean_length",
}
CURVES = {  # PNG name -> (metric in metrics.jsonl, axis label)
    "heldout": (HELDOUT, "held-out pass@1 (greedy)"),
    "reward": ("reward", "training reward (mean)"),
    "think_length": ("think/length", "tokens inside the thinking span"),
    "reasoning_fraction": ("reasoning/span_token_fraction", "reasoning-vocab share of span tokens"),
    "closed": ("think/closed_fraction", "completions that close the span"),
    "heldout_format": ("heldout/closed_boxed_rate", "held-out: span closed, boxed answer after it"),
    "heldout_answered": ("heldout/closed_answered_rate", "held-out: span closed, an answer (box or number) after it"),
}


class CompareError(ValueError):
    """Runs that cannot be compared; the message says why and what to change."""


@dataclass
class Run:
    """One run dir: its resolved config (flattened), its metrics records and the overrides Hydra ran it with."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    overrides: list[str] = field(default_factory=list)
    sweep: Path | None = None  # the sweep dir it came from

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


# ------------------------------------------------------------------------------------------ reading
def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists stay values).

    Example:
        >>> flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
        {'a.b': 1, 'a.c': [1, 2], 'd': None}
    """
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a metrics.jsonl (a torn last line, from a kill mid-write, is skipped)."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def _read_run(path: Path, sweep: Path | None) -> Run:
    config = flatten(yaml.safe_load((path / "config.yaml").read_text()) or {})
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return Run(path, config, read_metrics(path / "metrics.jsonl"), list(overrides or []), sweep)


def swept_keys(sweep_dir: Path) -> list[str]:
    """The keys a Hydra multirun varied (``a=1,2``, ``range(...)``, ``choice(...)``), from its ``multirun.yaml``."""
    record = sweep_dir / "multirun.yaml"
    if not record.is_file():
        return []
    task = ((yaml.safe_load(record.read_text()) or {}).get("hydra") or {}).get("overrides", {}).get("task") or []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task))
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """Every run under the given sweep dirs or run dirs, and the keys the sweeps varied (in order, once)."""
    runs: list[Run] = []
    swept: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise CompareError(f"{path}: not a directory (give sweep dirs or run dirs).")
        if is_run_dir(path):
            runs.append(_read_run(path, None))
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
        if not children:
            raise CompareError(f"{path}: neither a run dir (config.yaml + metrics.jsonl) nor a sweep dir holding any.")
        swept += [k for k in swept_keys(path) if k not in swept]
        runs += [_read_run(child, path) for child in children]
    return runs, swept


# ------------------------------------------------------------------------------------------ grouping
@dataclass
class Arm:
    """The runs that share one value of the ``by`` keys."""

    values: dict[str, Any]
    runs: list[Run]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items())


def _ignored(key: str, by: Sequence[str]) -> bool:
    return key in by or any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)


def group_runs(runs: list[Run], by: Sequence[str]) -> list[Arm]:
    """Runs grouped into arms by the ``by`` keys; refuses runs that differ in any other key of their configs."""
    if not runs:
        raise CompareError("no runs to compare.")
    for key in by:
        missing = [str(r.path) for r in runs if key not in r.config]
        if missing:
            raise CompareError(f"--by {key}: not a key of the config of {missing[0]} (and {len(missing) - 1} more).")
    reference = runs[0]
    differing: dict[str, set[str]] = {}
    for run in runs[1:]:
        for key in set(reference.config) | set(run.config):
            if _ignored(key, by):
                continue
            if reference.config.get(key) != run.config.get(key):
                differing.setdefault(key, set()).add(
                    f"{reference.config.get(key)!r} in {reference.path.name} vs {run.config.get(key)!r} in {run.path.name}"
                )
    if differing:
        lines = [f"  {key}: {sorted(v)[0]}" for key, v in sorted(differing.items())]
        raise CompareError(
            "these runs differ in more than the compared keys "
            f"({', '.join(by)}), seeds and output paths:\n" + "\n".join(lines) + "\n"
            "Compare runs that differ only in their variable, or add the keys to --by."
        )
    arms: dict[tuple, Arm] = {}
    for run in runs:
        values = {key: run.config.get(key) for key in by}
        arms.setdefault(tuple(json.dumps(v, sort_keys=True) for v in values.values()), Arm(values, [])).runs.append(
            run
        )
    return sorted(arms.values(), key=lambda a: [_sort_key(v) for v in a.values.values()])


def _sort_key(value: Any) -> tuple:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def baseline_arm(arms: list[Arm]) -> Arm:
    """The arm without a reasoning vocabulary when there is one (N=0), else the first."""
    for arm in arms:
        if arm.values.get("model.reasoning_vocab_size") == 0:
            return arm
    return arms[0]


# ------------------------------------------------------------------------------------------ per-run numbers
def curve(records: list[dict[str, Any]], metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``metric`` over a run, one point per step (the last record of a step wins)."""
    points: dict[int, float] = {}
    for record in records:
        value = record.get(metric)
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            points[int(record.get("step", 0))] = float(value)
    return sorted(points.items())


def area_under(points: list[tuple[int, float]]) -> float | None:
    """Trapezoidal area under a curve over its step range, divided by that range: its mean level.

    Example:
        >>> area_under([(0, 0.0), (10, 1.0)]), area_under([(0, 0.5), (5, 0.5), (10, 0.5)]), area_under([(3, 0.2)])
        (0.5, 0.5, 0.2)
    """
    if not points:
        return None
    if len(points) == 1:
        return points[0][1]
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False))
    return area / (points[-1][0] - points[0][0])


def steps_to(points: list[tuple[int, float]], target: float) -> int | None:
    """The first step at which the curve reaches ``target`` (None: never).

    Example:
        >>> steps_to([(0, 0.1), (10, 0.4), (20, 0.6), (30, 0.5)], 0.5), steps_to([(0, 0.1)], 0.5) is None
        (20, True)
    """
    return next((step for step, value in points if value >= target), None)


def tail_mean(points: list[tuple[int, float]], fraction: float = 0.1) -> float | None:
    """The mean of the last ``fraction`` of a curve's points (at least one).

    Example:
        >>> tail_mean([(i, float(i)) for i in range(10)], 0.2)
        8.5
    """
    if not points:
        return None
    k = max(1, round(len(points) * fraction))
    return sum(v for _, v in points[-k:]) / k


def run_metrics(run: Run, target: float | None, tail: float = 0.1) -> dict[str, Any]:
    """One run's numbers (None where the run did not log what a number needs)."""
    held = curve(run.records, HELDOUT)
    closed_boxed = curve(run.records, "heldout/closed_boxed_rate") or curve(run.records, "heldout/format_rate")
    answered = curve(run.records, "heldout/closed_answered_rate")
    out: dict[str, Any] = {
        "final_pass@1": held[-1][1] if held else None,
        "final_format": closed_boxed[-1][1] if closed_boxed else None,
        "final_answered": answered[-1][1] if answered else None,
        "auc_pass@1": area_under(held),
        "steps_to_target": steps_to(held, target) if target is not None and held else None,
        "last_step": max((int(r.get("step", 0)) for r in run.records), default=0),
    }
    for name, metric in TAIL_METRICS.items():
        out[name] = tail_mean(curve(run.records, metric), tail)
    return out


# ------------------------------------------------------------------------------------------ statistics
def bootstrap_ci(values: Sequence[float], reps: int = 10000, seed: int = 0, level: float = 0.95):
    """Mean of ``values`` and the percentile-bootstrap CI of the mean: ``(mean, low, high)``.

    Example:
        >>> bootstrap_ci([1.0, 1.0, 1.0])
        (1.0, 1.0, 1.0)
        >>> m, lo, hi = bootstrap_ci([0.0, 1.0] * 20); m, lo < 0.5 < hi
        (0.5, True)
    """
    values = [float(v) for v in values]
    if not values:
        return None, None, None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(reps))
    lo, hi = _percentiles(means, level)
    return sum(values) / n, lo, hi


def _percentiles(sorted_values: list[float], level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    k = len(sorted_values) - 1
    return sorted_values[int(math.floor(alpha * k))], sorted_values[int(math.ceil((1 - alpha) * k))]


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    """P(X > Y) over all pairs of runs, ties counted half (rliable's probability of improvement).

    Example:
        >>> probability_of_improvement([2, 3], [1, 1]), probability_of_improvement([1], [1]), probability_of_improvement([0], [1])
        (1.0, 0.5, 0.0)
    """
    pairs = [(a > b) + 0.5 * (a == b) for a in x for b in y]
    return sum(pairs) / len(pairs)


def compare_values(
    x: dict[Any, float], y: dict[Any, float], reps: int = 10000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Arm X against arm Y on one number: the difference of means with a bootstrap CI, and P(X > Y) with its CI.

    ``x`` and ``y`` map seed -> value. When both hold the same seeds the bootstrap resamples seeds in pairs
    (the runs of one seed share data order and initial sampling noise); otherwise each arm on its own.

    Example:
        >>> r = compare_values({1: 0.6, 2: 0.7, 3: 0.8}, {1: 0.5, 2: 0.6, 3: 0.7})
        >>> round(r["mean_diff"], 6), round(r["ci_low"], 6), round(r["ci_high"], 6), r["paired"]
        (0.1, 0.1, 0.1, True)
    """
    paired = set(x) == set(y) and len(x) > 1
    xs, ys = list(x.values()), list(y.values())
    rng = random.Random(seed)
    diffs, pis = [], []
    if paired:
        seeds = sorted(x, key=str)
        d = [x[s] - y[s] for s in seeds]
        for _ in range(reps):
            pick = [rng.choice(seeds) for _ in seeds]
            diffs.append(sum(x[s] - y[s] for s in pick) / len(pick))
            pis.append(probability_of_improvement([x[s] for s in pick], [y[s] for s in pick]))
        mean_diff = sum(d) / len(d)
    else:
        for _ in range(reps):
            bx, by = [rng.choice(xs) for _ in xs], [rng.choice(ys) for _ in ys]
            diffs.append(sum(bx) / len(bx) - sum(by) / len(by))
            pis.append(probability_of_improvement(bx, by))
        mean_diff = sum(xs) / len(xs) - sum(ys) / len(ys)
    lo, hi = _percentiles(sorted(diffs), level)
    pi_lo, pi_hi = _percentiles(sorted(pis), level)
    return {
        "mean_diff": mean_diff,
        "ci_low": lo,
        "ci_high": hi,
        "prob_improvement": probability_of_improvement(xs, ys),
        "pi_ci_low": pi_lo,
        "pi_ci_high": pi_hi,
        "paired": paired,
        "n": (len(xs), len(ys)),
    }


# ------------------------------------------------------------------------------------------ the comparison
NUMBERS = (
    "final_pass@1",
    "final_format",
    "final_answered",
    "auc_pass@1",
    "steps_to_target",
    "train_reward",
    "reasoning_span_fraction",
    "think_length",
    "closed_fraction",
    "completion_length",
)
PER_RUN = ("final_pass@1", "final_format", "final_answered", "auc_pass@1", "steps_to_target", "train_reward")
HIGHER_IS_BETTER = {"steps_to_target": False, "think_length": None, "completion_length": None}


def _arm_stats(values: dict[str, list[float | None]], reps: int) -> dict[str, Any]:
    stats = {}
    for name in NUMBERS:
        present = [v for v in values[name] if v is not None]
        mean, lo, hi = bootstrap_ci(present, reps) if present else (None, None, None)
        stats[name] = {"mean": mean, "ci_low": lo, "ci_high": hi, "n": len(present), "values": values[name]}
    return stats


def truncate(runs: list[Run], max_step: int) -> list[Run]:
    """The runs as they stood at ``max_step``: records after it dropped; refuses a run that did not get there."""
    short = [
        f"{r.path} (step {run_metrics(r, None)['last_step']})"
        for r in runs
        if run_metrics(r, None)["last_step"] < max_step
    ]
    if short:
        raise CompareError(f"--max-step {max_step}: these runs stopped before it:\n  " + "\n  ".join(short))
    return [
        Run(r.path, r.config, [x for x in r.records if int(x.get("step", 0)) <= max_step], r.overrides, r.sweep)
        for r in runs
    ]


def compare(
    runs: list[Run],
    by: Sequence[str],
    target: float | None = None,
    reps: int = 10000,
    require_finished: bool = True,
    max_step: int | None = None,
) -> dict[str, Any]:
    """The whole comparison as plain data (what compare.json holds).

    ``max_step``: compare the runs as they stood at that step (every run must have reached it); runs that
    stopped early (preempted, out of time) can then be compared on equal footing.
    """
    if max_step is not None:
        runs = truncate(runs, max_step)
        require_finished = False
    arms = group_runs(runs, by)
    if require_finished:
        short = [
            f"{r.path} (step {run_metrics(r, None)['last_step']} of {r.config.get('training.max_steps')})"
            for arm in arms
            for r in arm.runs
            if r.config.get("training.max_steps")
            and run_metrics(r, None)["last_step"] < r.config["training.max_steps"]
        ]
        if short:
            raise CompareError(
                "unfinished runs (resume them, or pass --allow-unfinished to compare them anyway):\n  "
                + "\n  ".join(short)
            )
    base = baseline_arm(arms)
    if target is None:  # steps to 80% of the baseline's mean final held-out accuracy
        finals = [run_metrics(r, None)["final_pass@1"] for r in base.runs]
        finals = [f for f in finals if f is not None]
        target = 0.8 * sum(finals) / len(finals) if finals and sum(finals) > 0 else None
    out_arms = []
    per_arm: dict[str, dict[Any, dict[str, Any]]] = {}
    for arm in arms:
        metrics = {str(r.seed): run_metrics(r, target) for r in arm.runs}
        per_arm[arm.label] = metrics
        values = {name: [m[name] for m in metrics.values()] for name in NUMBERS}
        out_arms.append(
            {
                "label": arm.label,
                "values": arm.values,
                "baseline": arm is base,
                "runs": [
                    {"dir": str(r.path), "seed": r.seed, "metrics": metrics[str(r.seed)]}
                    for r in sorted(arm.runs, key=lambda r: str(r.seed))
                ],
                "stats": _arm_stats(values, reps),
            }
        )
    differences = []
    for arm in arms:
        if arm is base:
            continue
        row: dict[str, Any] = {"arm": arm.label, "vs": base.label}
        for name in NUMBERS:
            x = {s: m[name] for s, m in per_arm[arm.label].items() if m[name] is not None}
            y = {s: m[name] for s, m in per_arm[base.label].items() if m[name] is not None}
            row[name] = compare_values(x, y, reps) if x and y else None
        differences.append(row)
    return {
        "by": list(by),
        "max_step": max_step,
        "target": target,
        "num_runs": len(runs),
        "arms": out_arms,
        "differences": differences,
        "notes": "95% percentile-bootstrap CIs over seeds (10,000 resamples); with 3 seeds they are coarse.",
    }


# ------------------------------------------------------------------------------------------ the report
def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{digits}f} [{stat['ci_low']:.{digits}f}, {stat['ci_high']:.{digits}f}]"


def markdown(result: dict[str, Any]) -> str:
    """compare.md: one row per arm (mean [95% CI] over seeds), then each arm against the baseline."""
    names = {
        "final_pass@1": "final held-out pass@1",
        "final_format": "final held-out format (span closed, boxed answer after it)",
        "final_answered": "final held-out answered (span closed, a box or number after it)",
        "auc_pass@1": "held-out AUC",
        "steps_to_target": "steps to target",
        "train_reward": "training reward",
        "reasoning_span_fraction": "reasoning share of span tokens",
        "think_length": "think length (tokens)",
        "closed_fraction": "closed span",
        "completion_length": "completion length",
    }
    target = result["target"]
    lines = [
        f"Arms by {', '.join(result['by'])}; {result['num_runs']} runs"
        + (f", as they stood at step {result['max_step']}" if result.get("max_step") is not None else "")
        + ". Mean [95% bootstrap CI] over seeds.",
        f"Steps to target: first held-out eval at pass@1 >= {target:.3f}." if target is not None else "",
        "",
        "| arm | seeds | " + " | ".join(names[n] for n in NUMBERS) + " |",
        "|---|---|" + "---|" * len(NUMBERS),
    ]
    for arm in result["arms"]:
        stats = arm["stats"]
        cells = [
            _fmt(stats[n], 1 if n in ("steps_to_target", "think_length", "completion_length") else 3) for n in NUMBERS
        ]
        reached = stats["steps_to_target"]["n"]
        cells[NUMBERS.index("steps_to_target")] += f" ({reached}/{len(arm['runs'])} reached)"
        lines.append(f"| {arm['label']} | {len(arm['runs'])} | " + " | ".join(cells) + " |")
    for diff in result["differences"]:
        lines += ["", f"**{diff['arm']}** minus **{diff['vs']}**:", ""]
        lines += ["| number | difference [95% CI] | P(arm > baseline) [95% CI] | paired |", "|---|---|---|---|"]
        for n in NUMBERS:
            d = diff[n]
            if d is None:
                lines.append(f"| {names[n]} | – | – | – |")
                continue
            lines.append(
                f"| {names[n]} | {d['mean_diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | "
                f"{d['prob_improvement']:.2f} [{d['pi_ci_low']:.2f}, {d['pi_ci_high']:.2f}] | {d['paired']} |"
            )
    lines += ["", "Per run:", "", "| arm | seed | " + " | ".join(names[n] for n in PER_RUN) + " | dir |"]
    lines.append("|---|---|" + "---|" * (len(PER_RUN) + 1))
    for arm in result["arms"]:
        for run in arm["runs"]:
            m = run["metrics"]
            cells = [
                "–" if m[n] is None else (f"{m[n]:.3f}" if isinstance(m[n], float) else str(m[n])) for n in PER_RUN
            ]
            lines.append(f"| {arm['label']} | {run['seed']} | " + " | ".join(cells) + f" | {Path(run['dir']).name} |")
    return "\n".join(line for line in lines if line is not None) + "\n"


def band(curves: list[list[tuple[int, float]]], reps: int = 2000) -> list[tuple[int, float, float, float]]:
    """Per step held by every curve: ``(step, mean, low, high)``, a 95% bootstrap band over the runs."""
    if not curves:
        return []
    common = set.intersection(*(set(s for s, _ in c) for c in curves))
    maps = [dict(c) for c in curves]
    out = []
    for step in sorted(common):
        mean, lo, hi = bootstrap_ci([m[step] for m in maps], reps)
        out.append((step, mean, lo, hi))
    return out


def plot_curves(runs_by_arm: dict[str, list[Run]], out_dir: Path) -> list[Path]:
    """One PNG per curve in CURVES that any run logged: each arm's mean over seeds with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (metric, label) in CURVES.items():
        series = {arm: [curve(r.records, metric) for r in runs] for arm, runs in runs_by_arm.items()}
        series = {arm: [c for c in cs if c] for arm, cs in series.items()}
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, curves_ in series.items():
            points = band(curves_)
            if not points:
                continue
            steps = [p[0] for p in points]
            ax.plot(steps, [p[1] for p in points], label=f"{arm} (n={len(curves_)})")
            ax.fill_between(steps, [p[2] for p in points], [p[3] for p in points], alpha=0.25)
        ax.set(xlabel="training step", ylabel=label, title=f"{label}: mean over seeds, 95% bootstrap band")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(result: dict[str, Any], runs: list[Run], out_dir: Path) -> list[Path]:
    """compare.json, compare.md and the curve PNGs in ``out_dir``."""
    if result.get("max_step") is not None:
        runs = truncate(runs, result["max_step"])
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "compare.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    md_path = out_dir / "compare.md"
    md_path.write_text(markdown(result))
    by = result["by"]
    runs_by_arm: dict[str, list[Run]] = {}
    for arm in group_runs(runs, by):
        runs_by_arm[arm.label] = arm.runs
    return [json_path, md_path, *plot_curves(runs_by_arm, out_dir)]
