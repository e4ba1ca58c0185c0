"""One GPU call: run the benchmark pieces of a part within a time budget, most important first.

    python -m bench.gpu_session --part 1 --out bench/results/part1 --budget-s 520
    python -m bench.gpu_session --part 2 --out bench/results/part2 --budget-s 520
    python -m bench.gpu_session --part 1 --dry-run          # the plan and its time estimates, nothing run

Part 1: the floor (copy bandwidth, matmul rate), the sampler checks, GRPO fast-512 (21 steps) with the
slow-step probes, the fix its probes point at, the core sampler rows (triton), the next fix, then the other
rows (eager attention, 128 x 1,024, the doubled vocabulary) and more fixes. A fix runs only if the fast-512
run had a slow step; the fixes are ordered by what its probes point at (``order_fixes``).
Part 2: GRPO fast-256x1024 (21 steps), trl-256x1024 (2 steps), fast-8192-rv (2 steps).
Part 3: fast-512 with its slow-step probes (Triton compiles counted) and with one prompt length (``fixed-prompt``),
side by side, then trl-256x1024, fast-256x1024 and fast-8192-rv for what is left of the budget.

Each piece runs in its own process with a timeout taken from what is left of the budget (capped per
piece) and a ``--deadline`` a little before it, so that it stops on its own and keeps what it measured; a
piece that fails or times out is recorded and the session goes on; a piece whose minimum does not fit is
skipped. ``--out`` holds at most three files, rewritten after every piece: ``session.json`` (everything),
``summary.md`` (the running summary) and ``logs.tar.gz`` (each piece's log and raw output). The end of
the output is a compact summary (pieces, floor, checks, sampler rows, GRPO table and slow-step lines).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 15.0  # a piece's deadline is this long before its timeout (time to write its results)
KILL_WAIT_S = 5.0  # after SIGTERM, wait this long before SIGKILL


@dataclass
class Piece:
    name: str
    cmd: list[str]  # the command; "{out}" and "{deadline}" are filled in at launch
    kind: str  # floor | check | sampler | grpo | other: how its output is read and summarised
    est_s: float  # expected wall time (s), for the plan
    min_s: float  # not started with less than this left (s)
    max_s: float  # timeout cap (s)
    note: str = ""
    fix_slot: bool = False  # a slow-step fix whose variant is chosen after the diagnosis run
    status: str = "pending"
    record: dict = field(default_factory=dict)


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def grpo_piece(variant: str, fix: str, est: float, min_s: float, max_s: float, note: str = "", slot=False) -> Piece:
    """A GRPO benchmark run of one variant with one slow-step fix."""
    cmd = _py("bench.bench_grpo", "--run-one", variant, "--fix", fix, "--partial", "{out}", "--deadline", "{deadline}")
    return Piece(f"grpo:{variant}:{fix}", cmd, "grpo", est, min_s, max_s, note, fix_slot=slot)


def sampler_piece(
    name: str, rows: list[str], est: float, min_s: float, max_s: float, note: str = "", extra: tuple[str, ...] = ()
) -> Piece:
    """A bench_sampler run over ``rows`` (``ROW@attention`` names)."""
    cmd = _py("bench.bench_sampler", "--rows", *rows, "--out", "{out}", "--deadline", "{deadline}", *extra)
    return Piece(name, cmd, "sampler", est, min_s, max_s, note)


def part_pieces(part: int) -> list[Piece]:
    """The pieces of a part, in the order they run (estimates: one H200, eager-attention sampler)."""
    if part == 1:
        core = [
            "32x512@triton",
            "32x512@eager",
            "256x1024@triton",
            "eos-spread@triton",
            "32x4096@triton",
            "256x1024@eager",
        ]
        rest = ["128x1024@triton", "256x1024-rv@triton"]
        rest += [f"{r}@eager" for r in ["32x512", "256x1024", "eos-spread", "32x4096", "128x1024", "256x1024-rv"]]
        return [
            Piece("floor", _py("bench.floor", "--out", "{out}"), "floor", 20, 10, 60, "bandwidth, matmul rate"),
            Piece(
                "check",
                _py("bench.check_sampler", "--out", "{out}", "--deadline", "{deadline}"),
                "check",
                120,
                40,
                220,
                "logprobs 32x512, distribution, mask",
            ),
            grpo_piece("fast-512", "plain", 110, 60, 170, "21 steps, slow-step probes (compile cache warm)"),
            grpo_piece("fast-512", "gc-freeze", 90, 60, 150, "fix the probes point at; only if slow steps", slot=True),
            sampler_piece("sampler:core", core, 330, 40, 380, "triton rows; ~50 s compile per new shape"),
            grpo_piece("fast-512", "compile-threads-1", 90, 60, 150, "next fix; only if slow steps", slot=True),
            sampler_piece("sampler:rest", rest, 600, 40, 600, "the other rows, eager side by side"),
            grpo_piece("fast-512", "pool-shutdown", 90, 60, 150, "more fixes, if time is left", slot=True),
            grpo_piece("fast-512", "expandable-segments", 90, 60, 150, "", slot=True),
        ]
    if part == 2:
        return [
            grpo_piece("fast-256x1024", "plain", 400, 120, 420, "21 steps of 256 x 1,024"),
            grpo_piece("trl-256x1024", "plain", 140, 80, 200, "2 steps of plain TRL"),
            grpo_piece("fast-8192-rv", "plain", 240, 150, 400, "2 steps of 32 x 8,192, vocab doubled"),
        ]
    if part == 3:  # the slow-step hypothesis tested side by side, then the research-scale rows in a short budget
        return [
            grpo_piece("fast-512", "plain", 110, 60, 170, "21 steps, slow-step probes with Triton compile counts"),
            grpo_piece("fast-512", "fixed-prompt", 110, 60, 170, "the same with one padded length on every step"),
            grpo_piece("trl-256x1024", "plain", 140, 80, 200, "2 steps of plain TRL"),
            grpo_piece("fast-256x1024", "plain", 300, 120, 420, "256 x 1,024, as many of 21 steps as fit"),
            grpo_piece("fast-8192-rv", "plain", 240, 150, 400, "2 steps of 32 x 8,192, vocab doubled"),
            sampler_piece(
                "sampler:profile",
                ["32x512@triton", "256x1024@triton"],
                200,
                60,
                300,
                "where a decode step's time goes (torch.profiler): busy share, launches per step, top kernels",
                extra=("--profile",),
            ),
        ]
    raise ValueError(f"--part must be 1, 2 or 3, not {part}")


TINY_ROWS = {"sampler:core": ["4x16@triton", "4x16@eager", "eos-spread-8x16@eager"], "sampler:rest": ["4x16-rv@eager"]}


def tiny_pieces(pieces: list[Piece]) -> list[Piece]:
    """The same pieces on the CPU with 2-layer models (a smoke test of the wiring): no floor, 2 GRPO steps."""
    out = []
    for p in pieces:
        if p.kind == "floor":
            continue
        cmd = list(p.cmd) + ["--tiny"]
        if p.kind == "grpo":
            cmd += ["--steps", "2"]
        if p.kind == "sampler":
            start = cmd.index("--rows") + 1
            end = cmd.index("--out")
            cmd[start:end] = TINY_ROWS.get(p.name, ["4x16@eager"])
            cmd += ["--bandwidth", "1e10"]
        out.append(Piece(p.name, cmd, p.kind, p.est_s, 0.0, 900.0, p.note + " (tiny, CPU)", p.fix_slot))
    return out


# ------------------------------------------------------------------------------------------ fix order
FIX_SIGNALS = [  # (words in the slow-step explanations, the fix that tests that cause)
    (("Triton",), "fixed-prompt"),
    (("GC",), "gc-freeze"),
    (("child", "machine busy", "ctx switches"), "compile-threads-1"),
    (("child", "machine busy"), "pool-shutdown"),
    (("cudaMalloc", "cudaFree", "alloc retries"), "expandable-segments"),
]


def order_fixes(diagnosis: dict | None, fixes: list[str]) -> list[str]:
    """The fixes, those whose cause the diagnosis run's slow steps point at first (stable otherwise).

    Example:
        >>> d = {"slow": [{"why": ["child CPU 14.0 s"]}]}
        >>> order_fixes(d, ["gc-freeze", "compile-threads-1", "pool-shutdown"])
        ['compile-threads-1', 'pool-shutdown', 'gc-freeze']
    """
    why = " ".join(w for s in (diagnosis or {}).get("slow", []) for w in s.get("why", []))
    score = {f: 0 for f in fixes}
    for words, fix in FIX_SIGNALS:
        if fix in score and any(w in why for w in words):
            score[fix] += 1
    return sorted(fixes, key=lambda f: -score[f])


# ------------------------------------------------------------------------------------------ running
def read_output(piece: Piece, path: Path):
    """What the piece wrote (JSON, or JSON lines for the sampler); None if nothing."""
    if not path.is_file() or not path.stat().st_size:
        return None
    text = path.read_text()
    if piece.kind == "sampler":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def extra_args(piece: Piece, ctx: dict) -> list[str]:
    """Arguments taken from earlier pieces: the measured bandwidth (sampler), the matmul peak (GRPO MFU)."""
    if piece.kind == "sampler" and ctx.get("bandwidth"):
        return ["--bandwidth", repr(ctx["bandwidth"])]
    if piece.kind == "grpo" and ctx.get("peak_flops"):
        return ["--peak-flops", repr(ctx["peak_flops"])]
    return []


def run_piece(piece: Piece, timeout: float, scratch: Path, ctx: dict) -> dict:
    """Run one piece with a timeout (its process group is ended at the timeout); its record."""
    out = scratch / f"{piece.name.replace(':', '_')}.{'jsonl' if piece.kind == 'sampler' else 'json'}"
    log = scratch / f"{piece.name.replace(':', '_')}.log"
    deadline = time.time() + max(timeout - GRACE_S, 1.0)
    cmd = [c.replace("{out}", str(out)).replace("{deadline}", f"{deadline:.1f}") for c in piece.cmd]
    cmd += extra_args(piece, ctx)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            _end_group(proc)
            rc, status = None, f"timeout after {timeout:.0f} s"
    wall = time.time() - t0
    output = read_output(piece, out)
    tail = log.read_text(errors="replace").splitlines()[-25:]
    if status.startswith("failed") and any("OutOfMemoryError" in line for line in tail):
        status += ", OOM"
    return {"status": status, "rc": rc, "wall_s": round(wall, 1), "timeout_s": round(timeout), "output": output,
            "log_tail": tail, "cmd": cmd}  # fmt: skip


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the piece's own process group (it and its compile workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def update_context(ctx: dict, piece: Piece, output) -> None:
    """Keep what later pieces need from a finished one."""
    if piece.kind == "floor" and isinstance(output, dict):
        ctx["bandwidth"] = output.get("bandwidth_Bps")
        ctx["peak_flops"] = output.get("bf16_flops")
        ctx["device"] = output.get("device")


def run_session(pieces: list[Piece], out_dir: Path, budget_s: float, reserve_s: float = 10.0, echo=print) -> dict:
    """Run ``pieces`` in order within ``budget_s``; write session.json, summary.md and logs.tar.gz after each."""
    from bench.bench_grpo import summarise

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    ctx: dict = {}
    session = {"started": start, "budget_s": budget_s, "pieces": []}
    scratch = Path(tempfile.mkdtemp(prefix="gpu-session-"))
    diagnosis: dict | None = None
    fixes_ordered = False
    for i, piece in enumerate(pieces):
        if piece.fix_slot and not fixes_ordered:  # reorder the fix slots by the diagnosis run's evidence
            diag = next(
                (p for p in pieces[:i] if p.kind == "grpo" and (p.record.get("output") or {}).get("steps")), None
            )
            diagnosis = summarise(diag.record["output"]) if diag else None
            slots = [j for j in range(i, len(pieces)) if pieces[j].fix_slot]
            names = order_fixes(diagnosis, [pieces[j].cmd[pieces[j].cmd.index("--fix") + 1] for j in slots])
            for j, fix in zip(slots, names, strict=True):
                cmd = pieces[j].cmd
                cmd[cmd.index("--fix") + 1] = fix
                pieces[j].name = ":".join(pieces[j].name.split(":")[:2] + [fix])
            fixes_ordered = True
        if piece.fix_slot and diagnosis and not diagnosis.get("slow"):
            piece.status = "skipped (the diagnosis run had no slow step)"
            piece.record = {"status": piece.status}
            _save(out_dir, session, pieces, start, ctx, scratch)
            continue
        left = budget_s - (time.time() - start) - reserve_s
        if left < piece.min_s:
            piece.status = f"skipped ({left:.0f} s left, needs {piece.min_s:.0f})"
            piece.record = {"status": piece.status}
        else:
            timeout = min(piece.max_s, left)
            echo(f"[{time.time() - start:5.0f} s] {piece.name}: start, timeout {timeout:.0f} s ({piece.note})")
            piece.record = run_piece(piece, timeout, scratch, ctx)
            piece.status = piece.record["status"]
            update_context(ctx, piece, piece.record["output"])
            echo(f"[{time.time() - start:5.0f} s] {piece.name}: {piece.status} in {piece.record['wall_s']:.0f} s")
        _save(out_dir, session, pieces, start, ctx, scratch)
    return session


def _save(out_dir: Path, session: dict, pieces: list[Piece], start: float, ctx: dict, scratch: Path) -> None:
    session["pieces"] = [{"name": p.name, "kind": p.kind, "note": p.note, **p.record} for p in pieces]
    session["elapsed_s"] = round(time.time() - start, 1)
    session["context"] = ctx
    write_outputs(out_dir, session, scratch)


def write_outputs(out_dir: Path, session: dict, scratch: Path) -> None:
    """session.json, summary.md and logs.tar.gz (every file of the scratch folder), each replaced whole."""
    from bench.workload import write_json

    write_json(out_dir / "session.json", session)
    (out_dir / "summary.md").write_text(summary(session, full=True))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(scratch.iterdir()):
            tar.add(path, arcname=path.name)
    tmp = out_dir / "logs.tar.gz.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_dir / "logs.tar.gz")


# ------------------------------------------------------------------------------------------ summary
def summary(session: dict, full: bool = False) -> str:
    """Markdown: the pieces' status, then each kind's results (``full``: also the per-position details)."""
    from bench import bench_grpo, bench_sampler, check_sampler, floor

    pieces = session["pieces"]
    lines = [
        f"# GPU session: {session.get('context', {}).get('device', '?')}, "
        f"{session.get('elapsed_s', 0):.0f} s of {session['budget_s']:.0f} s",
        "",
        "| piece | status | wall s | note |",
        "|---|---|---|---|",
    ]
    for p in pieces:
        lines.append(f"| {p['name']} | {p.get('status', 'pending')} | {p.get('wall_s', '–')} | {p.get('note', '')} |")

    def section(title: str, render) -> list[str]:
        try:
            return ["", title, *render()]
        except Exception as err:  # noqa: BLE001 - a summary bug must not lose the session
            return ["", title, f"(could not summarise: {err!r})"]

    outputs = {kind: [p for p in pieces if p["kind"] == kind and p.get("output")] for kind in ("floor", "check")}
    for p in outputs["floor"][:1]:
        out = p["output"]
        lines += section("## Floor", lambda out=out: [floor.markdown(out) if full else _floor_line(out)])
    for p in outputs["check"][:1]:
        out = p["output"]
        lines += section("## Sampler checks", lambda out=out: [f"- {x}" for x in check_sampler.verdict_lines(out)])
    rows = [r for p in pieces if p["kind"] == "sampler" for r in (p.get("output") or [])]
    if rows:
        lines += section("## Sampler rows", lambda: [bench_sampler.markdown(rows)])
    runs = [p["output"] for p in pieces if p["kind"] == "grpo" and p.get("output") and p["output"].get("steps")]
    if runs:
        lines += section("## GRPO", lambda: [bench_grpo.markdown(runs)])
    for p in pieces:
        if p.get("status", "").startswith(("failed", "timeout")):
            lines += [
                "",
                f"### {p['name']}: {p['status']} (log tail)",
                "```",
                *(x[:160] for x in p.get("log_tail", [])[-8:]),
                "```",
            ]
    return "\n".join(lines) + "\n"


def _floor_line(result: dict) -> str:
    rows = ", ".join(f"{r['batch']}x{r['tokens']} {r['floor_ms']:.2f} ms" for r in result["rows"])
    return (
        f"copy {result['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 matmul {result['bf16_flops'] / 1e12:.0f} TFLOP/s; "
        f"weights {result['weight_bytes'] / 1e9:.2f} GB; floor per step: {rows}"
    )


def plan_text(pieces: list[Piece], budget_s: float) -> str:
    """The plan: each piece's estimate and where the budget is expected to run out."""
    lines, total = [f"plan for {budget_s:.0f} s (estimates on one H200):"], 0.0
    for p in pieces:
        total += p.est_s
        flag = "" if total <= budget_s else "  <- likely past the budget (skipped or cut short)"
        lines.append(f"  {p.name:34s} ~{p.est_s:4.0f} s  (cumulative {total:5.0f} s)  {p.note}{flag}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", type=int, choices=[1, 2, 3], required=True, help="which set of pieces")
    parser.add_argument("--out", required=True, help="folder for session.json, summary.md, logs.tar.gz")
    parser.add_argument("--budget-s", type=float, default=520, help="wall-clock budget of the whole session (s)")
    parser.add_argument("--pieces", nargs="*", default=None, help="run only these pieces, in this order (plan names)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: every piece with 2-layer models")
    args = parser.parse_args(argv)

    pieces = part_pieces(args.part)
    if args.pieces:
        unknown = [n for n in args.pieces if n not in {p.name for p in pieces}]
        if unknown:
            parser.error(f"unknown pieces {unknown}; part {args.part} has {[p.name for p in pieces]}")
        by_name = {p.name: p for p in pieces}
        pieces = [by_name[n] for n in args.pieces]  # in the order given
    if args.tiny:
        pieces = tiny_pieces(pieces)
    print(plan_text(pieces, args.budget_s), flush=True)
    if args.dry_run:
        return 0
    out_dir = Path(args.out)
    if (out_dir / "session.json").exists():
        parser.error(f"{out_dir} already holds a session.json: choose another --out (nothing is overwritten)")
    session = run_session(pieces, out_dir, args.budget_s)
    print("\n" + summary(session), flush=True)
    print(f"wrote {out_dir}/session.json, summary.md, logs.tar.gz", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
