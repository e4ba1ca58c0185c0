"""rlvr-compare: the arms of an experiment side by side, from the run dirs alone (offline clusters too).

    rlvr-compare outputs/think_arith/multirun/2026-12-01_10-00-00 --out results/think_arith
    rlvr-compare runs/base-s1 runs/base-s2 runs/rv-s1 runs/rv-s2 --by model.reasoning_vocab_size --out cmp/

Arms are the values of ``--by`` (default: the keys the Hydra sweep varied, but ``seed``; for plain run dirs,
``model.reasoning_vocab_size``). Runs whose resolved configs differ in anything else (seeds, output names
and paths excepted) are refused, naming the keys. Writes ``compare.json`` (the list ``arms``: each arm's
values, runs and statistics; ``differences``: each arm against the baseline), ``compare.md`` (tables) and
PNG curves per arm with 95% bootstrap bands. The statistics live in rlvr_vocab/comparison.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlvr_vocab.comparison import DEFAULT_BY, CompareError, compare, find_runs, write_report


def main(argv: list[str] | None = None) -> int:
    """Console script ``rlvr-compare``; exits 2 on runs that cannot be compared."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="sweep dirs (a Hydra multirun folder) and/or run dirs")
    parser.add_argument("--out", required=True, help="folder for compare.json, compare.md and the PNGs")
    parser.add_argument("--by", nargs="+", default=None, help="config keys that define the arms")
    parser.add_argument("--target", type=float, default=None, help="held-out pass@1 for 'steps to target' "
                        "(default: 80%% of the baseline arm's mean final pass@1)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument("--allow-unfinished", action="store_true", help="compare runs that stopped before max_steps")
    parser.add_argument("--max-step", type=int, default=None, help="compare the runs as they stood at this step")
    args = parser.parse_args(argv)
    try:
        runs, swept = find_runs(args.paths)
        by = args.by or [k for k in swept if k != "seed"] or list(DEFAULT_BY)
        result = compare(runs, by, args.target, args.reps, not args.allow_unfinished, args.max_step)
        written = write_report(result, runs, Path(args.out))
    except CompareError as err:
        print(f"rlvr-compare: {err}", file=sys.stderr)
        return 2
    print(Path(args.out, "compare.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
