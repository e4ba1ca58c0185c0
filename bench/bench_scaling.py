"""Multi-GPU scaling of GRPO training through the repo's own launcher: 1 -> 2 -> 4 -> 8 GPUs, DDP and FSDP2.

    python -m bench.bench_scaling --gpus 1,2,4,8 --strategy ddp,fsdp2 --reasoning-vocab 0,151936 --out DIR
    python -m bench.bench_scaling --device cpu --gpus 1,2 --strategy ddp --steps 2 --warmup 0 --out DIR  # smoke

Each point runs the command that slurm/train_*.sh runs (``rlvr_vocab.launch.build_command``, with
``ACCELERATE_CONFIG=<strategy>`` and ``RLVR_NPROC_PER_NODE=<GPUs>``): one GPU is plain ``python``, several are
``accelerate launch --config_file slurm/accelerate/<strategy>.yaml`` (outside Slurm the srun wrapper is left out and
its one-node task runs as is). The script is ``bench/scaling_train.py``, grpo_train.py's Hydra app plus a per-rank
step recorder. One GPU has no DDP or FSDP wrapper, so its point is shared by both strategies' series.

Workload (``bench.workload``): Qwen3-0.6B's shape with random weights (bf16, its 151,936-token word-level
tokenizer), saved once under ``DIR/workload`` and loaded as a local model; prompts of 48-80 random tokens ending in
an open ``<think>`` span (``dataset.think=true``); every completion runs to full length
(``min_new_tokens = max_completion_length``). Weak scaling: the per-GPU batch is fixed (``--completions-per-gpu``
completions per optimizer step on every GPU), so N GPUs do N times the work per step. ``--device cpu``: the 2-layer
tiny shape and a 512-token vocabulary over gloo processes, to test this script.

Columns: s/step (median over the measured steps of the slowest rank's step), generation share (time in
``_generate_single_turn`` / step time, median over ranks), completion tokens per step (all ranks), completion
tokens/s (all ranks, and per GPU), weak-scaling efficiency (tokens/s per GPU over the 1-GPU point's), peak memory
per GPU (``torch.cuda.max_memory_allocated``, the largest rank's, over the measured steps; max RSS on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.workload import TINY_VOCAB, VOCAB, build_model, build_prompts, build_tokenizer, median, write_json
from rlvr_vocab.launch import build_command

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "bench/scaling_train.py"  # grpo_train.py's app + the step recorder (relative: the launcher runs in REPO)
RECORDS_ENV = "RLVR_SCALING_RECORDS"


@dataclass
class Point:
    gpus: int
    strategy: str  # ddp | fsdp2 (the accelerate config); "single" for one GPU (plain python, no wrapper)
    reasoning: int  # N reasoning rows

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.gpus}gpu-rv{self.reasoning}"


def points(gpus: list[int], strategies: list[str], reasoning: list[int]) -> list[Point]:
    """The runs to make: one per (strategy, N, GPUs > 1), plus one 1-GPU run per N that every strategy shares.

    Example:
        >>> [p.name for p in points([1, 2], ["ddp", "fsdp2"], [0])]
        ['single-1gpu-rv0', 'ddp-2gpu-rv0', 'fsdp2-2gpu-rv0']
    """
    out = []
    for n in reasoning:
        if 1 in gpus:
            out.append(Point(1, "single", n))
        out += [Point(g, s, n) for s in strategies for g in sorted(gpus) if g > 1]
    return out


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4].

    Example:
        >>> int_list("1, 2,8")
        [1, 2, 8]
    """
    return [int(x) for x in text.split(",") if x.strip()]


# ------------------------------------------------------------------------------------------ setup
def visible_gpus() -> int:
    import torch as th

    return th.cuda.device_count() if th.cuda.is_available() else 0


def check_devices(gpus: list[int], device: str, visible: int) -> None:
    """Refuse (SystemExit 2) when a point needs more GPUs than this machine shows.

    Example:
        >>> check_devices([1, 2], "cuda", 2)
        >>> check_devices([1, 8], "cuda", 1)
        Traceback (most recent call last):
        ...
        SystemExit: --gpus asks for up to 8 GPUs but 1 is visible (CUDA_VISIBLE_DEVICES=<unset>): run on a machine with 8 GPUs, or drop 8 from --gpus (--device cpu runs gloo processes instead)
    """
    if device != "cuda":
        return
    want = max(gpus)
    if want > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise SystemExit(
            f"--gpus asks for up to {want} GPUs but {visible} {'is' if visible == 1 else 'are'} visible "
            f"(CUDA_VISIBLE_DEVICES={shown}): run on a machine with {want} GPUs, or drop "
            f"{','.join(str(g) for g in gpus if g > visible)} from --gpus (--device cpu runs gloo processes instead)"
        )


def prepare_workload(out: Path, device: str, prompts: int, seed: int = 0) -> tuple[Path, Path]:
    """Save the workload model + tokenizer (once) and write the prompts file; (model dir, prompts file)."""
    import torch as th

    tiny = device == "cpu"
    vocab = TINY_VOCAB if tiny else VOCAB
    model_dir = out / "workload" / ("tiny" if tiny else "qwen3-0.6b-shape")
    if not (model_dir / "config.json").is_file():
        tok = build_tokenizer(vocab)
        dtype = th.float32 if tiny else th.bfloat16
        model = build_model(tok, seed, tiny=tiny, device="cpu", dtype=dtype)
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, model_dir)
    data = out / "workload" / f"prompts-{vocab}.jsonl"
    lines = [json.dumps({"problem": p, "answer": "0"}) for p in build_prompts(prompts, seed, vocab, chat=False)]
    data.write_text("\n".join(lines) + "\n")
    return model_dir, data


def overrides(args, point: Point, model_dir: Path, data: Path, run_dir: Path) -> list[str]:
    """Hydra overrides of one point (grpo_train.py's config; the same for every strategy and GPU count)."""
    cuda = args.device == "cuda"
    steps = args.warmup + args.steps
    micro = args.micro_batch or args.completions_per_gpu
    if args.completions_per_gpu % micro:
        raise SystemExit(
            f"--completions-per-gpu {args.completions_per_gpu} is not a multiple of --micro-batch {micro}"
        )
    return [
        "exp_name=scaling",
        f"hydra.run.dir={run_dir}",
        f"model.name_or_path={model_dir}",
        "model.source=hub",
        f"model.model_kwargs.dtype={'bfloat16' if cuda else 'float32'}",
        f"model.reasoning_vocab_size={point.reasoning}",
        "model.reasoning.repeat_policy=cycle",  # N = the whole vocabulary: every source row is copied once
        "model.reasoning.span_check_steps=0",
        f"++model.generation_kwargs.min_new_tokens={args.completion}",  # every completion runs to full length
        "dataset.name=scaling",
        f"dataset.path={data}",
        "dataset.problem_key=problem",
        "dataset.answer_key=answer",
        "dataset.answer_format=plain",
        "dataset.split=train",
        "dataset.eval_split=null",
        "dataset.prompt_template='{problem}'",  # quoted: braces are Hydra grammar
        "dataset.think=true",  # the prompt opens the span: reasoning rows are live for the whole completion
        "reward.funcs=[boxed_format]",  # a regex, so scoring costs what it costs in training, not more
        f"training.max_steps={steps}",
        f"training.per_device_train_batch_size={micro}",
        f"training.gradient_accumulation_steps={args.completions_per_gpu // micro}",
        f"training.num_generations={args.generations}",
        f"training.max_completion_length={args.completion}",
        f"training.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"training.bf16={str(cuda).lower()}",
        "training.learning_rate=1e-6",
        "training.lr_scheduler_type=constant",
        "training.warmup_steps=0",
        "training.save_strategy=no",
        "training.logging_steps=1",
        f"seed={args.seed}",
    ]


def launch_env(point: Point, device: str, port: int) -> dict[str, str]:
    """What the launcher reads for one point (as an sbatch job would have it)."""
    env = {"RLVR_NPROC_PER_NODE": str(point.gpus), "MASTER_PORT": str(port)}
    env["ACCELERATE_CONFIG"] = point.strategy if point.strategy != "single" else "ddp"
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(point.gpus))
    return env


def runnable(command: list[str]) -> list[str]:
    """The launcher's command as it runs here: inside a Slurm job as built; outside, srun's one-node task itself.

    Example:
        >>> runnable(["python", "grpo_train.py", "x=1"])
        ['python', 'grpo_train.py', 'x=1']
        >>> runnable(["srun", "--nodes=1", "bash", "-c", "exec python -m accelerate.commands.launch x"])[:2]
        ['bash', '-c']
    """
    if command[0] != "srun" or (os.environ.get("SLURM_JOB_ID") and shutil.which("srun")):
        return command
    return ["bash", "-c", command[-1]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ one point
def run_point(args, point: Point, model_dir: Path, data: Path, out: Path) -> dict:
    """Launch one point; its records per rank (or an error with the log's tail)."""
    folder = out / "points" / point.name
    shutil.rmtree(folder, ignore_errors=True)
    records = folder / "records"
    records.mkdir(parents=True)
    env = launch_env(point, args.device, _free_port())
    command = build_command(
        overrides(args, point, model_dir, data, folder / "run"), env, python=sys.executable, script=SCRIPT
    )
    run_env = {**os.environ, **env, RECORDS_ENV: str(records), "SLURM_NODEID": "0", "PYTHONUNBUFFERED": "1"}
    run_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_env.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        run_env["CUDA_VISIBLE_DEVICES"] = ""
        run_env.setdefault("OMP_NUM_THREADS", "1")
    shown = shlex.join(command)
    (folder / "command.txt").write_text(
        " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + f" {RECORDS_ENV}={records} {shown}\n"
    )
    print(f"=== {point.name}: {shown[:400]}", flush=True)
    t0 = time.time()
    log = folder / "log.txt"
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                runnable(command), cwd=REPO, env=run_env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout
            )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = {"point": asdict(point), "name": point.name, "command": command, "rc": rc, "wall_s": time.time() - t0}
    for weights in (folder / "run").glob("*.safetensors"):  # the final model (GBs per point): not a result here
        weights.unlink()
    result["ranks"] = read_records(records)
    if rc != 0:
        text = log.read_text(errors="replace")
        result["error"] = "OOM" if "OutOfMemoryError" in text else f"failed (rc {rc})"
        result["log_tail"] = text[-3000:]
        print(f"   {result['error']}; log: {log}\n" + "\n".join(text.splitlines()[-12:]), flush=True)
    return result


def read_records(records: Path) -> dict[int, list[dict]]:
    """Rank -> its JSON lines (begin, steps, end)."""
    out = {}
    for path in sorted(records.glob("rank-*.jsonl")):
        out[int(path.stem.split("-")[1])] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


WORKLOAD_KEYS = ("device", "steps", "warmup", "completions_per_gpu", "micro_batch", "generations", "completion")
WORKLOAD_KEYS += ("gradient_checkpointing", "seed")


def previous_results(path: Path, args: dict) -> dict[str, dict]:
    """Successful points of an earlier call into the same folder with the same workload (name -> result), so a
    sweep can be split over several calls (a device lease of 10 minutes a command); {} if none or it differed.

    Example:
        >>> previous_results(Path("/nonexistent/scaling.json"), {})
        {}
    """
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if any(data.get("args", {}).get(k) != args.get(k) for k in WORKLOAD_KEYS):
        return {}
    return {r["name"]: r for r in data.get("raw", []) if r.get("rc") == 0 and r.get("ranks")}


# ------------------------------------------------------------------------------------------ reading results
def summarise(result: dict, warmup: int) -> dict:
    """One table row: step time, generation share, tokens/s (total, per GPU), peak memory, from every rank."""
    point = result["point"]
    row = {"name": result["name"], **point}
    ranks = result.get("ranks", {})
    steps = {r: [x for x in recs if x.get("event") == "step"] for r, recs in ranks.items()}
    begin = {r: next((x for x in recs if x.get("event") == "begin"), {}) for r, recs in ranks.items()}
    end = {r: next((x for x in recs if x.get("event") == "end"), {}) for r, recs in ranks.items()}
    if result.get("error"):
        row["error"] = result["error"]
    if len(steps) < point["gpus"] or not all(steps.values()):
        row.setdefault("error", f"{len(steps)} of {point['gpus']} ranks recorded steps")
        return row
    n_steps = min(len(s) for s in steps.values())
    measured = list(range(warmup, n_steps)) or list(range(n_steps))
    step_s = [max(steps[r][i]["step_s"] for r in steps) for i in measured]  # the slowest rank sets the pace
    tokens = [sum(steps[r][i].get("completion_tokens", 0) for r in steps) for i in measured]
    shares = [
        sum(steps[r][i].get("generation_s", 0.0) for i in measured) / sum(steps[r][i]["step_s"] for i in measured)
        for r in steps
    ]
    peaks = [max((steps[r][i].get("peak_allocated_gib") or 0.0) for i in measured) for r in steps]
    rss = [end[r].get("max_rss_gib") for r in end if end[r].get("max_rss_gib") is not None]
    s_med, tok_med = median(step_s), median(tokens)
    first = begin[min(begin)]
    row.update(
        {
            "distributed_type": first.get("distributed_type"),
            "fsdp_version": first.get("fsdp_version"),
            "device": first.get("device"),
            "world_size": first.get("world_size"),
            "measured_steps": len(measured),
            "s_per_step": s_med,
            "s_per_step_mean": sum(step_s) / len(step_s),
            "generation_share": median(shares),
            "completion_tokens_per_step": tok_med,
            "tokens_per_s": tok_med / s_med if s_med else None,
            "tokens_per_s_per_gpu": tok_med / s_med / point["gpus"] if s_med else None,
            "peak_gib_per_gpu": max(peaks) if any(peaks) else None,
            "peak_gib_per_gpu_min": min(peaks) if any(peaks) else None,
            "max_rss_gib": max(rss) if rss else None,
            "fused_head": any(end[r].get("fused_head_calls", 0) > 0 for r in end),
            "ranks_agree_on_steps": len({len(s) for s in steps.values()}) == 1,
        }
    )
    return row


def add_efficiency(rows: list[dict]) -> list[dict]:
    """Weak-scaling efficiency: tokens/s per GPU over the 1-GPU point's (same N).

    Example:
        >>> rows = [{"gpus": 1, "reasoning": 0, "tokens_per_s_per_gpu": 100.0},
        ...         {"gpus": 2, "reasoning": 0, "tokens_per_s_per_gpu": 90.0}]
        >>> [r["efficiency"] for r in add_efficiency(rows)]
        [1.0, 0.9]
    """
    base = {r["reasoning"]: r.get("tokens_per_s_per_gpu") for r in rows if r["gpus"] == 1}
    for r in rows:
        b, v = base.get(r["reasoning"]), r.get("tokens_per_s_per_gpu")
        r["efficiency"] = v / b if b and v else None
    return rows


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def table(rows: list[dict], strategies: list[str]) -> str:
    """Markdown table, one series per (strategy, N); the shared 1-GPU point heads every series."""
    lines = [
        "| strategy | N reasoning rows | GPUs | s/step | generation share | completion tokens/step "
        "| completion tok/s (total) | tok/s per GPU | weak-scaling efficiency | peak GiB per GPU | runs as |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy in strategies:
        for n in sorted({r["reasoning"] for r in rows}):
            series = [r for r in rows if r["reasoning"] == n and r["strategy"] in ("single", strategy)]
            for r in sorted(series, key=lambda r: r["gpus"]):
                if "s_per_step" not in r:
                    lines.append(f"| {strategy} | {n:,} | {r['gpus']} | {r.get('error', '?')} |  |  |  |  |  |  |  |")
                    continue
                peak = r["peak_gib_per_gpu"]
                peak_s = "–" if peak is None else f"{peak:.1f}"
                if peak is not None and r["peak_gib_per_gpu_min"] is not None and r["gpus"] > 1:
                    peak_s = f"{r['peak_gib_per_gpu_min']:.1f}–{peak:.1f}"
                if peak is None and r.get("max_rss_gib"):
                    peak_s = f"RSS {r['max_rss_gib']:.1f}"
                runs_as = "python (1 process)" if r["gpus"] == 1 else str(r["distributed_type"])
                if r.get("fsdp_version"):
                    runs_as += f" v{r['fsdp_version']}"
                runs_as += ", fused head" if r.get("fused_head") else ""
                lines.append(
                    f"| {strategy} | {n:,} | {r['gpus']} | {r['s_per_step']:.3f} | {_fmt(r['generation_share'], '.0%')} "
                    f"| {r['completion_tokens_per_step']:,.0f} | {_fmt(r['tokens_per_s'], ',.0f')} "
                    f"| {_fmt(r['tokens_per_s_per_gpu'], ',.0f')} | {_fmt(r['efficiency'], '.0%')} | {peak_s} | {runs_as} |"
                )
    return "\n".join(lines)


def plot(rows: list[dict], strategies: list[str], path: Path) -> bool:
    """Completion tokens/s and s/step against GPUs, a line per (strategy, N), ideal weak scaling dotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_tok, ax_step) = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy in strategies:
        for n in sorted({r["reasoning"] for r in rows}):
            series = sorted(
                (
                    r
                    for r in rows
                    if r["reasoning"] == n and r["strategy"] in ("single", strategy) and "s_per_step" in r
                ),
                key=lambda r: r["gpus"],
            )
            if not series:
                continue
            label = f"{strategy}, N={n:,}"
            gpus = [r["gpus"] for r in series]
            (line,) = ax_tok.plot(gpus, [r["tokens_per_s"] for r in series], "o-", label=label)
            base = next((r for r in series if r["gpus"] == 1), None)
            if base:
                ax_tok.plot(gpus, [base["tokens_per_s"] * g for g in gpus], ":", color=line.get_color(), alpha=0.6)
            ax_step.plot(gpus, [r["s_per_step"] for r in series], "o-", label=label, color=line.get_color())
    for ax, what in ((ax_tok, "completion tokens/s (all GPUs); dotted: ideal"), (ax_step, "s per optimizer step")):
        ax.set_xscale("log", base=2)
        ticks = sorted({r["gpus"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("GPUs (same batch per GPU)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    if ax_tok.get_lines():
        ax_tok.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int_list, default=[1, 2, 4, 8], help="GPU counts, e.g. 1,2,4,8")
    parser.add_argument("--strategy", default="ddp,fsdp2", help="accelerate configs in slurm/accelerate/: ddp,fsdp2")
    parser.add_argument("--reasoning-vocab", type=int_list, default=[0], help="N reasoning rows, e.g. 0,151936")
    parser.add_argument("--out", required=True, help="folder for scaling.json, scaling.md, scaling.png and the runs")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: tiny model, gloo processes")
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps per point")
    parser.add_argument("--warmup", type=int, default=2, help="steps before them (compile, graph capture)")
    parser.add_argument("--completions-per-gpu", type=int, default=32, help="completions per GPU per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=16, help="completions per micro-batch")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (GRPO group)")
    parser.add_argument("--completion", type=int, default=512, help="tokens per completion (all run to full length)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="training.gradient_checkpointing=true")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="rerun points already measured in --out")
    args = parser.parse_args(argv)

    strategies = [s for s in args.strategy.split(",") if s]
    for s in strategies:
        if not (REPO / "slurm" / "accelerate" / f"{s}.yaml").is_file():
            parser.error(f"--strategy {s}: no slurm/accelerate/{s}.yaml")
    if args.device == "cpu":
        args.completion = min(args.completion, 16)
        args.micro_batch = min(args.micro_batch, args.completions_per_gpu)
    check_devices(args.gpus, args.device, visible_gpus() if args.device == "cuda" else 0)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    per_gpu_prompts = args.completions_per_gpu // args.generations
    # as many prompts whatever --gpus asks (so the data, hence its shuffled order, is the same in every call)
    prompts = per_gpu_prompts * max(8, *args.gpus) * (args.warmup + args.steps) + 8
    model_dir, data = prepare_workload(out, args.device, prompts)

    done = previous_results(out / "scaling.json", vars(args)) if not args.fresh else {}
    results, rows = [], []
    for point in points(args.gpus, strategies, args.reasoning_vocab):
        if point.name in done:
            print(
                f"=== {point.name}: measured before with the same workload ({out / 'scaling.json'}), kept", flush=True
            )
            results.append(done.pop(point.name))
        else:
            results.append(run_point(args, point, model_dir, data, out))
        kept = results + list(done.values())  # points of earlier calls that this one did not ask for stay
        rows = add_efficiency([summarise(r, args.warmup) for r in kept])
        write_json(out / "scaling.json", {"args": vars(args), "summary": rows, "raw": kept})
    rows = add_efficiency([summarise(r, args.warmup) for r in results + list(done.values())])
    shown = [s for s in ("ddp", "fsdp2") if any(r["strategy"] == s for r in rows)]
    shown += [s for s in strategies if s not in shown]
    md = table(rows, shown)
    (out / "scaling.md").write_text(md + "\n")
    drew = plot(rows, shown, out / "scaling.png")
    print("\n" + md)
    print(f"\nwrote {out / 'scaling.json'}, {out / 'scaling.md'}" + (f", {out / 'scaling.png'}" if drew else ""))
    return 0 if all("s_per_step" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
