"""GPU benchmark: GRPO steps of a Qwen3-0.6B-shaped model, ours (fast sampler) vs TRL's plain generate.

Each variant runs in its own process (clean peak-memory numbers) through the project's own trainer classes
(RLVRGRPOConfig / RLVRGRPOTrainer; with ``generation_backend=trl`` and N=0 that is TRL's GRPOTrainer path
unchanged). The model is built from a config with random weights (no download), bf16; every completion runs
to full length (``min_new_tokens = max_completion_length``, so EOS is suppressed in both backends alike).

    python -m bench.bench_grpo --list
    python -m bench.bench_grpo --variants fast-512 trl-512             # table + bench/results/bench.json
    python -m bench.bench_grpo --variants fast-512 --fixes plain gc-freeze compile-threads-1

Timing: a step is one optimizer step (all its completions generated, scored and trained on), bracketed by
``torch.cuda.synchronize()``; the first ``--warmup`` steps (compile, CUDA-graph capture) are left out of the
mean and median. Each step is split into generation (``_generate_single_turn``), scoring (the rest of
``_generate_and_score_completions``: rewards, advantages) and training (the rest of the step), and carries the
slow-step probes of ``bench.diagnostics`` (GC, recompiles, captures, allocator, host CPU).

``--fixes`` runs each variant once per candidate fix for slow steps (see ``FIXES``), side by side.

Training-side model-FLOPs utilisation (MFU) = (6 x parameters x tokens trained + attention) / (step time -
generation time) / peak; tokens trained = sequences x padded length (prompt + completion), attention
6 x layers x heads x head_dim x length^2 per sequence (causal, forward + backward). The peak is the measured
bf16 matmul rate when given (``--peak-flops``, as ``bench.gpu_session`` does), else the device's data-sheet
peak; the result says which.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.workload import (
    PROMPT_TOKENS,
    TINY_VOCAB,
    VOCAB,
    build_dataset,
    build_model,
    build_tokenizer,
    median,
    random_reward,
    stated_peak,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Variant:
    name: str
    backend: str  # fast | trl
    reasoning: int  # N reasoning rows (0 = baseline)
    completion: int  # tokens per completion
    micro_batch: int  # completions per micro-batch (completions // micro_batch accumulation steps)
    checkpointing: bool
    steps: int  # optimizer steps, warm-up included
    label: str
    completions: int = 32  # completions per optimizer step
    generations: int = 8  # completions per prompt (completions // generations prompts per step)


VARIANTS = {
    v.name: v
    for v in [
        Variant("trl-512", "trl", 0, 512, 16, False, 3, "plain TRL (HF generate), baseline"),
        Variant("fast-512", "fast", 0, 512, 16, False, 21, "ours (fast sampler), baseline"),
        Variant("trl-512-rv", "trl", VOCAB, 512, 16, False, 3, "plain TRL (HF generate), vocab doubled"),
        Variant("fast-512-rv", "fast", VOCAB, 512, 16, False, 6, "ours, vocab doubled (reasoning)"),
        Variant("fast-2048", "fast", 0, 2048, 8, True, 4, "ours, 2,048 tokens, baseline, ckpt on"),
        Variant("fast-2048-rv", "fast", VOCAB, 2048, 8, True, 4, "ours, 2,048 tokens, vocab doubled, ckpt on"),
        Variant("fast-8192-rv", "fast", VOCAB, 8192, 8, True, 2, "ours, 8,192 tokens, vocab doubled, ckpt on"),
        Variant("fast-256x1024", "fast", 0, 1024, 16, False, 21, "ours, 16 x 16 completions of 1,024", 256, 16),
        Variant("trl-256x1024", "trl", 0, 1024, 16, False, 2, "plain TRL, 16 x 16 completions of 1,024", 256, 16),
    ]
}

# Candidate fixes for the slow steps: environment for the child process, and in-process actions after step 1.
FIXES = {
    "plain": ({}, "nothing changed (the diagnosis run)"),
    "gc-freeze": ({}, "gc.collect(); gc.freeze() after setup and after the warm-up step"),
    "compile-threads-1": ({"TORCHINDUCTOR_COMPILE_THREADS": "1"}, "no inductor compile-worker pool"),
    "pool-shutdown": ({}, "shut inductor's compile workers down after the warm-up step"),
    "expandable-segments": ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "allocator segments grow"),
    "cold-cache": ({}, "a fresh, empty inductor/triton cache (compiles from scratch)"),
    "fixed-prompt": ({}, "every prompt 80 words: one padded length on every step (no new shapes after step 1)"),
    "cold-jit-cache": ({}, "a fresh, empty CUDA driver JIT cache (CUDA_CACHE_PATH): as on a machine never used"),
    "cudnn-sdpa": ({}, "training.cudnn_attention=true: SDPA may take cuDNN's attention (torch's Hopper default)"),
    "no-cudnn-sdpa": ({}, "training.cudnn_attention=false: SDPA never takes cuDNN's attention"),
}
FIXED_PROMPT = (PROMPT_TOKENS[1], PROMPT_TOKENS[1])


# ------------------------------------------------------------------------------------------ FLOPs
def training_flops(params: int, layers: int, heads: int, head_dim: int, sequences: int, length: int) -> float:
    """Model FLOPs of one training pass (forward + backward) over ``sequences`` of ``length`` tokens.

    6 x params per token, plus causal attention: 6 x layers x heads x head_dim x length^2 per sequence.

    Example:
        >>> training_flops(10, 1, 1, 1, 2, 3) == 6 * 10 * 6 + 2 * 6 * 9
        True
    """
    return 6.0 * params * sequences * length + 6.0 * layers * heads * head_dim * length**2 * sequences


def fix_parts(fix: str) -> list[str]:
    """The fixes of a run: names of ``FIXES`` joined by ``+`` (they combine).

    Example:
        >>> fix_parts("cold-jit-cache+cudnn-sdpa"), fix_parts("plain")
        (['cold-jit-cache', 'cudnn-sdpa'], ['plain'])
    """
    parts = fix.split("+")
    unknown = [p for p in parts if p not in FIXES]
    if unknown:
        raise ValueError(f"unknown fix {'+'.join(unknown)!r}; choose from {', '.join(FIXES)} (join with +)")
    return parts


def fix_what(fix: str) -> str:
    return "; ".join(FIXES[p][1] for p in fix_parts(fix))


def apply_fix_env(fix: str) -> None:
    """Set the fix's environment variables (before torch is imported in this process)."""
    parts = fix_parts(fix)
    for part in parts:
        os.environ.update(FIXES[part][0])
    if "cold-cache" in parts:
        root = tempfile.mkdtemp(prefix="bench-cold-cache-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = root
        os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
    if "cold-jit-cache" in parts:  # the driver caches the SASS it JIT-compiles from PTX here, across processes
        os.environ["CUDA_CACHE_PATH"] = tempfile.mkdtemp(prefix="bench-cold-jit-")


# ------------------------------------------------------------------------------------------ timing a trainer
def time_generation(trainer, sync, current: dict, params: int, config) -> None:
    """Wrap the trainer's generation so each call adds to ``current``: generation_s, completion_tokens,
    trained_tokens, flops (of training on what was generated) and gen_and_score_s (generation plus rewards).

    ``sync``: ``torch.cuda.synchronize`` on the GPU (a no-op elsewhere); the caller clears ``current`` per step.
    """
    original_generate = trainer._generate_single_turn
    original_score = trainer._generate_and_score_completions

    def timed_generate(*a, **k):
        prompt_ids = a[0] if a else k["prompt_ids"]
        sync()
        t0 = time.perf_counter()
        ids, logps = original_generate(*a, **k)
        sync()
        current["generation_s"] = current.get("generation_s", 0.0) + time.perf_counter() - t0
        current["completion_tokens"] = current.get("completion_tokens", 0) + sum(len(c) for c in ids)
        length = max(len(p) for p in prompt_ids) + max(len(c) for c in ids)
        current["trained_tokens"] = current.get("trained_tokens", 0) + len(ids) * length
        current["flops"] = current.get("flops", 0.0) + training_flops(
            params,
            config.num_hidden_layers,
            config.num_attention_heads,
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            len(ids),
            length,
        )
        return ids, logps

    def timed_score(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = original_score(*a, **k)
        sync()
        current["gen_and_score_s"] = current.get("gen_and_score_s", 0.0) + time.perf_counter() - t0
        return out

    trainer._generate_single_turn = timed_generate
    trainer._generate_and_score_completions = timed_score


# ------------------------------------------------------------------------------------------ one run
def run_variant(
    v: Variant,
    seed: int = 0,
    tiny: bool = False,
    fix: str = "plain",
    deadline: float | None = None,
    partial: str | None = None,
    peak_flops: float | None = None,
) -> dict:
    """Train ``v.steps`` optimizer steps (fewer if ``deadline``, unix time, would pass); every step's record.

    ``tiny``: a 2-layer model on the CPU with 16-token completions (a smoke test of this script).
    ``partial``: a JSON file rewritten after every step (what a killed run leaves).
    """
    import torch as th
    from omegaconf import OmegaConf
    from transformers import TrainerCallback

    from bench.diagnostics import StepProbe
    from rlvr_vocab.config import ReasoningVocabConfig
    from rlvr_vocab.reasoning_vocab import extend_model
    from rlvr_vocab.trainer import RLVRGRPOConfig, RLVRGRPOTrainer, checkpointing_field, cudnn_attention_on

    cuda = th.cuda.is_available() and not tiny
    sync = th.cuda.synchronize if cuda else (lambda: None)
    fixes = fix_parts(fix)
    vocab_size = TINY_VOCAB if tiny else VOCAB
    if tiny:
        v = replace(v, completion=16, micro_batch=8, completions=min(v.completions, 32), generations=8)
        v = replace(v, reasoning=vocab_size if v.reasoning else 0)
    t_setup = time.perf_counter()
    tok = build_tokenizer(vocab_size)
    model = build_model(tok, seed, tiny)
    vocab = None
    if v.reasoning:
        rcfg = OmegaConf.structured(ReasoningVocabConfig(repeat_policy="cycle"))
        vocab = extend_model(model, tok, v.reasoning, rcfg)
    params = sum(p.numel() for p in model.parameters())
    config = model.config
    args = RLVRGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{v.name}-"),
        max_steps=v.steps,
        per_device_train_batch_size=v.micro_batch,
        gradient_accumulation_steps=v.completions // v.micro_batch,
        num_generations=v.generations,
        max_completion_length=v.completion,
        generation_kwargs={"min_new_tokens": v.completion},  # full length in both backends
        generation_backend=v.backend,
        beta=0.0,
        learning_rate=1e-6,
        bf16=cuda,
        use_cpu=not cuda,
        **{checkpointing_field(): v.checkpointing},  # its name depends on the transformers version
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        disable_dropout=True,
        # null (the repo's default): on from 1,024-token completions (trainer.cudnn_attention_on)
        cudnn_attention=True if "cudnn-sdpa" in fixes else False if "no-cudnn-sdpa" in fixes else None,
    )
    prompts = v.steps * v.completions // v.generations
    trainer = RLVRGRPOTrainer(
        model=model,
        reward_funcs=[random_reward],
        args=args,
        train_dataset=build_dataset(
            prompts + 8, seed, vocab_size, FIXED_PROMPT if "fixed-prompt" in fixes else PROMPT_TOKENS
        ),
        processing_class=tok,
        reasoning_vocab=vocab,
    )

    device = th.cuda.get_device_name() if cuda else "cpu"
    peak, peak_source = (peak_flops, "measured bf16 matmul") if peak_flops else (stated_peak(device), "data sheet")
    result: dict = {
        "variant": v.name,
        "label": v.label,
        "fix": fix,
        "fix_what": fix_what(fix),
        "config": asdict(v),
        "params": params,
        "peak_flops": peak,
        "peak_source": peak_source if peak else None,
        "device": device,
        "torch": th.__version__,
        "env": {
            k: os.environ.get(k)
            for k in ("TORCHINDUCTOR_COMPILE_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_CACHE_PATH")
        },
        "cudnn_attention": cudnn_attention_on(args.cudnn_attention, args.max_completion_length),
        "cudnn": th.backends.cudnn.version() if cuda else None,
        "setup_s": None,
        "steps": [],
        "stopped_early": None,
    }
    try:
        import torch._inductor.config as inductor_config

        result["env"]["inductor_compile_threads"] = inductor_config.compile_threads
    except Exception:  # noqa: BLE001
        pass
    current: dict = {}
    time_generation(trainer, sync, current, params, config)
    probe = StepProbe(lambda: getattr(trainer, "fast_sampler", None))

    def after_warmup() -> None:
        try:
            if "gc-freeze" in fixes:
                gc.collect()
                gc.freeze()
            if "pool-shutdown" in fixes:
                from torch._inductor import async_compile

                async_compile.shutdown_compile_workers()
        except Exception as err:  # noqa: BLE001 - a torch without the hook: say so, keep measuring
            result["fix_error"] = repr(err)[:300]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            current.clear()
            probe.begin()
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **k):
            sync()
            step_s = time.perf_counter() - self.t0
            record = {"step": len(result["steps"]) + 1, "step_s": round(step_s, 4)}
            record.update({k: round(x, 4) if isinstance(x, float) else x for k, x in current.items()})
            gen, both = current.get("generation_s", 0.0), current.get("gen_and_score_s", 0.0)
            record["scoring_s"] = round(max(both - gen, 0.0), 4)
            record["training_s"] = round(step_s - max(both, gen), 4)
            if peak and step_s > gen:
                record["mfu"] = round(current.get("flops", 0.0) / (step_s - gen) / peak, 4)
            record.update(probe.end())
            result["steps"].append(record)
            print(
                f"[{v.name}/{fix}] step {record['step']}: {step_s:.2f} s (generation {gen:.2f} s)",
                flush=True,
            )
            if record["step"] == 1:
                after_warmup()
            left = (deadline - time.time()) if deadline else float("inf")
            later = [s["step_s"] for s in result["steps"][1:]]
            next_s = median(later) if later else 0.7 * step_s  # the warm-up step holds the compile
            if left < 1.15 * next_s + 5 and state.global_step < args.max_steps:
                result["stopped_early"] = f"deadline: {left:.0f} s left after step {record['step']}"
                control.should_training_stop = True
            if partial:
                write_json(partial, result)

    trainer.add_callback(StepTimer())
    if "gc-freeze" in fixes:
        gc.collect()
        gc.freeze()  # everything built so far (tokenizer, dataset, model, trainer) is never scanned again
    result["gc_tracked_objects_at_start"] = len(gc.get_objects())
    result["setup_s"] = round(time.perf_counter() - t_setup, 2)
    try:
        trainer.train()
    finally:
        probe.close()
    sampler = getattr(trainer, "fast_sampler", None)
    result["fast_path_used"] = bool(getattr(sampler, "last_used_fast_path", False))
    result["peak_allocated_gib"] = probe.run_peak_bytes / 2**30
    result["peak_reserved_gib"] = probe.run_peak_reserved_bytes / 2**30
    try:
        from torch._dynamo.utils import compile_times

        result["compile_times"] = str(compile_times(repr="str", aggregate=True))[:2000]
    except Exception:  # noqa: BLE001
        pass
    if partial:
        write_json(partial, result)
    return result


# ------------------------------------------------------------------------------------------ reading results
def summarise(result: dict, warmup: int = 1, slow_factor: float = 1.25) -> dict:
    """One table row of a run: mean, median, generation share, tokens/s, MFU, and which steps were slow."""
    from bench.diagnostics import explain

    row = {"variant": result["variant"], "label": result.get("label", ""), "fix": result.get("fix", "plain")}
    if "error" in result and not result.get("steps"):
        return {**row, "error": result["error"]}
    steps = result["steps"]
    measured = steps[warmup:] or steps
    times = [s["step_s"] for s in measured]
    mean, med = sum(times) / len(times), median(times)
    gens = [s.get("generation_s", 0.0) for s in measured]
    tokens = median([s.get("completion_tokens", 0) for s in measured])
    mfus = [s["mfu"] for s in measured if "mfu" in s]
    slow_steps = [s for s in measured if s["step_s"] > slow_factor * med]
    typical = [s for s in measured if s["step_s"] <= slow_factor * med]
    row.update(
        {
            "s_per_step": mean,
            "s_per_step_median": med,
            "mean_over_median": mean / med if med else None,
            "generation_s": sum(gens) / len(gens),
            "generation_share": sum(gens) / sum(times) if sum(times) else None,
            "completion_tokens": tokens,
            "completion_tokens_per_s": tokens / mean if mean else None,
            "mfu": median(mfus),
            "peak_source": result.get("peak_source"),
            "peak_gib": result.get("peak_allocated_gib", 0.0),
            "measured_steps": len(measured),
            "fast_path_used": result.get("fast_path_used"),
            "cache": compile_cache_state(steps[0]) if steps else "?",
            "slow": [
                {
                    "step": s["step"],
                    "s": s["step_s"],
                    "gen_s": s.get("generation_s"),
                    "why": explain(s, typical),
                    "stacks": s.get("stacks", {}).get("top", [])[:2],  # where the host thread was most often
                }
                for s in slow_steps
            ],
        }
    )
    if result.get("error"):
        row["error"] = result["error"]
    if result.get("stopped_early"):
        row["stopped_early"] = result["stopped_early"]
    return row


def compile_cache_state(first_step: dict) -> str:
    """'warm', 'cold', 'mixed' or 'none' from the FX-graph cache counters of the warm-up step.

    Example:
        >>> compile_cache_state({"dynamo": {"inductor.fxgraph_cache_hit": 3}})
        'warm'
    """
    d = first_step.get("dynamo", {})
    hit, miss = d.get("inductor.fxgraph_cache_hit", 0), d.get("inductor.fxgraph_cache_miss", 0)
    if hit and not miss:
        return "warm"
    if miss and not hit:
        return "cold"
    return "mixed" if hit else "none"


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """Markdown table of ``summarise`` rows."""
    lines = [
        "| variant | fix | s/step mean | median | mean/median | generation s (share) | completion tok/s "
        "| training MFU | peak GiB | steps | slow steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "s_per_step" not in r:
            lines.append(
                f"| {r['variant']} | {r.get('fix', '')} | {r.get('error', '?')} | – | – | – | – | – | – | – | – |"
            )
            continue
        share = f"{r['generation_s']:.2f} ({r['generation_share']:.0%})" if r.get("generation_share") else "–"
        slow = ", ".join(str(s["step"]) for s in r["slow"]) or "none"
        lines.append(
            f"| {r['variant']} | {r['fix']} | {r['s_per_step']:.2f} | {r['s_per_step_median']:.2f} | "
            f"{_fmt(r['mean_over_median'], '.2f')} | {share} | {_fmt(r['completion_tokens_per_s'], ',.0f')} | "
            f"{_fmt(r['mfu'], '.1%')} | {r['peak_gib']:.1f} | {r['measured_steps']} | {slow} |"
        )
    return "\n".join(lines)


def slow_lines(rows: list[dict]) -> str:
    """One line per run: mean, median, mean/median, cache state, and each slow step with the counters that moved."""
    out = []
    for r in rows:
        if "s_per_step" not in r:
            out.append(f"{r['variant']}/{r.get('fix', '')}: {r.get('error', '?')}")
            continue
        parts = [
            f"{r['variant']}/{r['fix']}: mean {r['s_per_step']:.2f} median {r['s_per_step_median']:.2f} "
            f"mean/median {_fmt(r['mean_over_median'], '.2f')} ({r['measured_steps']} steps, cache {r['cache']})"
        ]
        for s in r["slow"][:8]:
            why = "; ".join(s["why"]) or "no counter moved"
            parts.append(f"step {s['step']} {s['s']:.2f} s (gen {_fmt(s['gen_s'], '.2f')}): {why}")
        if len(r["slow"]) > 8:
            parts.append(f"... {len(r['slow']) - 8} more slow steps")
        if not r["slow"]:
            parts.append("no slow steps")
        if r.get("stopped_early"):
            parts.append(r["stopped_early"])
        out.append(" | ".join(parts))
    return "\n".join(out)


def markdown(results: list[dict], warmup: int = 1) -> str:
    """The table and slow-step lines of several runs."""
    rows = [summarise(r, warmup) for r in results]
    return table(rows) + "\n\n" + "\n".join(f"- {line}" for line in slow_lines(rows).splitlines())


# ------------------------------------------------------------------------------------------ command line
def run_child(name: str, fix: str, args, partial: Path) -> dict:
    """Run one (variant, fix) in its own process; its result, or an error record with what it left."""
    cmd = [sys.executable, "-m", "bench.bench_grpo", "--run-one", name, "--fix", fix, "--partial", str(partial)]
    cmd += ["--steps", str(args.steps)] if args.steps else []
    cmd += ["--micro-batch", str(args.micro_batch)] if args.micro_batch else []
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--deadline", str(args.deadline)] if args.deadline else []
    cmd += ["--peak-flops", str(args.peak_flops)] if args.peak_flops else []
    print(f"=== {name} / {fix}: {VARIANTS[name].label}; {fix_what(fix)}", flush=True)
    timeout = max(args.deadline - time.time() + 30, 1) if args.deadline else None
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, timeout=timeout
        )
        output, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, rc = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), "timeout"
    lines = output.splitlines()
    for line in lines:
        tag = line.find(f"[{name}/{fix}] step ")
        if tag >= 0 or "Error" in line:
            print("   " + line[max(tag, 0) :][:300], flush=True)
    if rc == 0 and partial.is_file():
        return json.loads(partial.read_text())
    print("\n".join(lines[-15:]), flush=True)
    left = json.loads(partial.read_text()) if partial.is_file() else {"variant": name, "fix": fix}
    left["label"] = VARIANTS[name].label
    left["error"] = "OOM" if "OutOfMemoryError" in output else f"failed (rc {rc})"
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names (see --list)")
    parser.add_argument("--fixes", nargs="*", default=["plain"], help=f"slow-step fixes to try: {', '.join(FIXES)}")
    parser.add_argument("--steps", type=int, default=None, help="override every variant's step count")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the averages")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "bench.json"), help="JSON results")
    parser.add_argument("--list", action="store_true", help="print the variants and fixes and exit")
    parser.add_argument("--micro-batch", type=int, default=None, help="override every variant's micro-batch")
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU, 16 tokens (smoke test)")
    parser.add_argument("--deadline", type=float, default=None, help="unix time by which every run has stopped")
    parser.add_argument("--peak-flops", type=float, default=None, help="bf16 peak for MFU (default: data sheet)")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fix", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--partial", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.list:
        for v in VARIANTS.values():
            print(f"{v.name:14s} {v.steps:3d} steps  {v.label}")
        for name, (env, what) in FIXES.items():
            print(f"--fixes {name:20s} {what} {env or ''}")
        return 0
    unknown = [n for n in args.variants if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown}; see --list")
    for fix in args.fixes:
        try:
            fix_parts(fix)
        except ValueError as err:
            parser.error(str(err))
    if args.run_one:
        apply_fix_env(args.fix)  # before torch is imported
        v = VARIANTS[args.run_one]
        v = replace(v, steps=args.steps or v.steps, micro_batch=args.micro_batch or v.micro_batch)
        run_variant(v, tiny=args.tiny, fix=args.fix, deadline=args.deadline, partial=args.partial,
                    peak_flops=args.peak_flops)  # fmt: skip
        return 0

    out = Path(args.out)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as scratch:
        for name in args.variants:
            for fix in args.fixes:
                results.append(run_child(name, fix, args, Path(scratch) / f"{name}-{fix}.json"))
                rows = [summarise(r, args.warmup) for r in results]
                write_json(out, {"summary": rows, "raw": results})
    print("\n" + markdown(results, args.warmup))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
