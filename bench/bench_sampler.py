"""Generation alone (no training): the fast sampler per batch x tokens row, against the memory-bandwidth floor.

    python -m bench.bench_sampler                                   # the default rows, both attention paths
    python -m bench.bench_sampler --rows 32x512 256x1024-rv --attention triton --repeats 2
    python -m bench.bench_sampler --rows eos-spread                 # EOS at 10-100% of the length vs full rows

One process: the models (Qwen3-0.6B shape, random weights, bf16) and one sampler per attention path are built
once and reused, so each (batch, cache length, model, attention) compiles once (35-50 s on the GPU) and the
later runs of it are measured warm. Every run generates ``tokens`` new tokens per row (``min_new_tokens``);
its time includes the prefill. A row's first run holds the compile and the CUDA-graph captures; the table
reports the last run. ms per decode step = run time / tokens; tokens/s = completion tokens / run time;
floor = ``bench.floor.floor_seconds`` over the run's rows and lengths; share of floor = floor / run time.

Row names: ``BxL`` (batch x new tokens), ``BxL-rv`` (vocabulary doubled: N = 151,936 reasoning rows, the
prompts' ``<think>`` span open), ``eos-spread`` (256 x 1,024 with EOS forced at lengths spread from 10% to
100%, against a batch of the same number of tokens at full length: the ratio of their times is reported;
needs the sampler's ``force_eos_at`` or ``logits_hook``). ``ROW@triton`` runs that row with one attention path
only; a bare name runs once per ``--attention``. A path with ``-unfused`` (``triton-unfused``) is that attention
with ``FastSampler(fuse=False)``: transformers' decoder layers, for the fused layers' side-by-side ratio;
``-torchpick``: ``FastSampler(pick="torch")``, the token pick in PyTorch ops instead of the Triton kernel;
``-torchlinear`` / ``-lino`` / ``-linod`` / ``-linqkv`` / ``-lingated`` / ``-linqkvgated`` / ``-linall``:
``FastSampler(linear="torch" / "o" / "o+down" / "o+down+qkv" / "o+down+gated" / "o+down+qkv+gated" / "all")``,
which of the fused layers' projections ``triton_linear`` runs (none: all cuBLAS; ``gated``: gate/up with SiLU x up
in one kernel); ``-fold`` / ``-nofold``: ``FastSampler(fold="on" / "off")``, the decoder layers' RMSNorms folded
into the projections after them (``norm_fold``) or not; ``-pdl`` / ``-nopdl``: ``FastSampler(pdl="on" / "off")``,
the step's Triton kernels with programmatic dependent launch;
``-peel``: ``triton_decode.PEEL`` on around that path's runs (``PATH_CONSTANTS``: kernel variants with no sampler
option), the attention kernel's first cache block loaded before the query's work; ``-cpre`` / ``-epre`` /
``-fpre``: ``FastSampler(prefill="compiled" / "eager" / "fused")``, the prefill through transformers' layers
``torch.compile``d (dynamic shapes) or not, or through the fused layers (the default's choice on CUDA). A
sampler without the ``attention=`` option has one path, today's eager one: its rows are labelled
``eager (only path)`` and other paths are skipped.

Each finished row is appended to ``--out`` (JSON lines) at once; with ``--deadline`` a row that would not
finish in time (estimated from the floor, plus a compile when its sampler has not compiled yet and graph
captures when its shape is new) is recorded as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import re
import time
from dataclasses import dataclass

from bench.workload import (
    TINY_VOCAB,
    VOCAB,
    build_model,
    build_prompts,
    build_tokenizer,
    completion_lengths,
    force_eos,
    sampler_options,
    sampler_stats,
    session_paths,
    spread_lengths,
    stats_delta,
    timed,
)

DEFAULT_ROWS = ["32x512", "256x1024", "eos-spread", "32x4096", "128x1024", "256x1024-rv"]
COMPILE_S = 60.0  # one compile of a sampler's decode step (s), for the deadline (12-03 on the H200: 12-62 s)
CAPTURE_S = 2.0  # a new batch or cache length on a compiled sampler: CUDA-graph captures only (12-03: ~0.6 s)
EOS_SPREAD = (256, 1024)  # batch x tokens of the EOS-spread test


@dataclass(frozen=True)
class Row:
    name: str
    batch: int
    tokens: int
    reasoning: bool
    eos_spread: bool = False


def parse_row(name: str) -> Row:
    """A row from its name (without an ``@attention`` suffix).

    Example:
        >>> parse_row("256x1024-rv")
        Row(name='256x1024-rv', batch=256, tokens=1024, reasoning=True, eos_spread=False)
        >>> parse_row("eos-spread").batch
        256
    """
    if name == "eos-spread":
        return Row(name, *EOS_SPREAD, reasoning=False, eos_spread=True)
    m = re.fullmatch(r"(eos-spread-)?(\d+)x(\d+)(-rv)?", name)
    if not m:
        raise ValueError(f"row {name!r}: expected BxL, BxL-rv, eos-spread or eos-spread-BxL")
    return Row(name, int(m.group(2)), int(m.group(3)), bool(m.group(4)), eos_spread=bool(m.group(1)))


def plan_rows(names: list[str], attentions: list[str]) -> list[tuple[Row, str]]:
    """(row, attention) pairs in order: ``name@attention`` as given, a bare name once per ``attentions``.

    Example:
        >>> [(r.name, a) for r, a in plan_rows(["32x512", "eos-spread@eager"], ["triton", "eager"])]
        [('32x512', 'triton'), ('32x512', 'eager'), ('eos-spread', 'eager')]
    """
    plan = []
    for name in names:
        base, _, attention = name.partition("@")
        for a in [attention] if attention else attentions:
            plan.append((parse_row(base), a))
    return plan


PROFILE_TOP = 80  # kernels listed per profiled row (a 32-row step runs ~20 small kernels outside its layers)

PATH_SUFFIXES = {  # suffix -> FastSampler option
    "-unfused": ("fuse", False),
    "-torchpick": ("pick", "torch"),
    "-torchlinear": ("linear", "torch"),
    "-lino": ("linear", "o"),
    "-linod": ("linear", "o+down"),
    "-linqkv": ("linear", "o+down+qkv"),
    "-linall": ("linear", "all"),
    "-lingated": ("linear", "o+down+gated"),
    "-linqkvgated": ("linear", "o+down+qkv+gated"),
    "-fold": ("fold", "on"),
    "-nofold": ("fold", "off"),
    "-pdl": ("pdl", "on"),
    "-nopdl": ("pdl", "off"),
    "-cpre": ("prefill", "compiled"),
    "-epre": ("prefill", "eager"),
    "-fpre": ("prefill", "fused"),
}
# suffix -> a module constant set while that path's sampler captures its CUDA graphs and runs (a kernel variant with
# no FastSampler option; the constant is read when the kernels are launched, so each path's graphs keep its value)
PATH_CONSTANTS = {"-peel": ("rlvr_vocab.sampling.triton_decode", "PEEL", True)}


def split_path(path: str | None) -> tuple[str | None, dict]:
    """(attention, FastSampler options) of a path name: ``-unfused`` is ``fuse=False``, ``-torchpick``
    ``pick="torch"`` (the token pick in PyTorch ops instead of ``triton_pick``); suffixes combine.

    Example:
        >>> split_path("triton-unfused"), split_path("triton-torchpick-unfused"), split_path(None)
        (('triton', {'fuse': False}), ('triton', {'pick': 'torch', 'fuse': False}), (None, {}))
        >>> split_path("triton-peel-nopdl")
        ('triton', {'pdl': 'off', 'constants': (('rlvr_vocab.sampling.triton_decode', 'PEEL', True),)})
    """
    options: dict = {}
    suffixes = [*PATH_SUFFIXES, *PATH_CONSTANTS]
    while path is not None and (suffix := next((x for x in suffixes if path.endswith(x)), None)):
        if suffix in PATH_CONSTANTS:
            options["constants"] = (PATH_CONSTANTS[suffix], *options.get("constants", ()))
        else:
            key, value = PATH_SUFFIXES[suffix]
            options = {key: value, **options}
        path = path.removesuffix(suffix)
    return path, options


@contextlib.contextmanager
def module_constants(constants=()):
    """``(module, name, value)`` triples set inside the block (``PATH_CONSTANTS``) and restored after it."""
    saved = []
    try:
        for module, name, value in constants:
            target = importlib.import_module(module)
            saved.append((target, name, getattr(target, name)))
            setattr(target, name, value)
        yield
    finally:
        for target, name, old in reversed(saved):
            setattr(target, name, old)


def estimate_s(row: Row, floor_ms: float, repeats: int, new_compile: bool, new_shape: bool = True) -> float:
    """Rough seconds a row takes: repeats x tokens x (1.5 ms + 1.4 x floor), + a compile when the row's sampler
    has not compiled yet in this process, + CUDA-graph captures for a new shape, + the EOS companion.

    The decode step is compiled with the batch and cache length dynamic, so a sampler compiles once and a new
    shape costs only graph captures. The per-step model is 2-27% above the fused sampler's rows of 12-03 on the
    H200 (1.80 ms at 32 x 512 to 7.35 ms at 256 x 1,024 with the vocabulary doubled): a deadline errs early.

    Example:
        >>> round(estimate_s(Row("x", 32, 512, False), 0.56, 2, new_compile=True))
        65
        >>> spread = Row("eos-spread", 256, 1024, False, eos_spread=True)
        >>> round(estimate_s(spread, 4.28, 2, new_compile=True)), round(estimate_s(spread, 4.28, 2, False, False))
        (92, 30)
    """
    run = row.tokens * (1.5 + 1.4 * floor_ms) / 1e3
    total = repeats * run + (COMPILE_S if new_compile else 0.0) + (CAPTURE_S if new_shape else 0.0) + 1.0
    if row.eos_spread:  # the spread batch (~0.55 of the steps' work; captures per compacted size) + the companion
        total += repeats * run * 0.6 + 2 * CAPTURE_S
    return total


# ------------------------------------------------------------------------------------------ one run
class Bench:
    """Models, samplers and compile bookkeeping shared by the rows of one process."""

    def __init__(
        self, tiny: bool, bandwidth: float | None, repeats: int, compile: bool | None, seed: int = 0, profile=False
    ):
        import torch as th

        self.tiny = tiny
        self.cuda = th.cuda.is_available() and not tiny
        self.sync = th.cuda.synchronize if self.cuda else (lambda: None)
        self.vocab_size = TINY_VOCAB if tiny else VOCAB
        self.tok = build_tokenizer(self.vocab_size)
        self.bandwidth = bandwidth
        self.repeats = repeats
        self.compile = compile
        self.seed = seed
        self.profile = profile  # one more generation per row under torch.profiler: where a decode step's time goes
        self.models: dict[bool, tuple] = {}
        self.samplers: dict[tuple, object] = {}
        self.shapes_seen: set[tuple] = set()

    def model(self, reasoning: bool):
        """(model, reasoning vocab or None, weight bytes, KV bytes per token), built once."""
        if reasoning not in self.models:
            from omegaconf import OmegaConf

            from bench.floor import model_kv_bytes_per_token, weight_bytes
            from rlvr_vocab.config import ReasoningVocabConfig
            from rlvr_vocab.reasoning_vocab import extend_model

            model = build_model(self.tok, self.seed, self.tiny).eval()
            vocab = None
            if reasoning:
                rcfg = OmegaConf.structured(ReasoningVocabConfig(repeat_policy="cycle"))
                vocab = extend_model(model, self.tok, self.vocab_size, rcfg)
            elem = next(model.parameters()).element_size()
            self.models[reasoning] = (model, vocab, weight_bytes(model), model_kv_bytes_per_token(model.config, elem))
        return self.models[reasoning]

    def sampler(self, reasoning: bool, attention: str | None):
        """The sampler of this path (``split_path``'s suffixes), built once."""
        from bench.workload import make_sampler

        key = (reasoning, attention)
        if key not in self.samplers:
            _, vocab, _, _ = self.model(reasoning)
            base, options = split_path(attention)
            options.pop("constants", None)  # set around the runs (run)
            self.samplers[key] = make_sampler(vocab, compile=self.compile, attention=base, **options)
        return self.samplers[key]

    def is_new_shape(self, row: Row, attention, batch: int | None = None) -> bool:
        return (row.reasoning, attention, batch or row.batch, row.tokens) not in self.shapes_seen

    def needs_compile(self, row: Row, attention) -> bool:
        """True until a row of this model and attention path has run here (its sampler then holds the compile)."""
        return not any(seen[:2] == (row.reasoning, attention) for seen in self.shapes_seen)

    def run(self, row: Row, attention, batch: int, eos_lengths: list[int] | None = None) -> dict:
        """``repeats`` generations of ``batch`` rows; the last one's numbers, every run's time."""
        import torch as th

        from bench.floor import floor_seconds

        model, _, wbytes, kv = self.model(row.reasoning)
        sampler = self.sampler(row.reasoning, attention)
        prompts = build_prompts(batch, self.seed, self.vocab_size)
        device = "cuda" if self.cuda else "cpu"
        inputs = self.tok(prompts, return_tensors="pt", padding=True).to(device)
        prompt_lens = inputs["attention_mask"].sum(1).tolist()
        common = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=self.tok.pad_token_id)
        common["max_new_tokens"] = row.tokens
        hook = None
        if eos_lengths is None:
            common["min_new_tokens"] = row.tokens
        else:
            hook = force_eos(sampler, eos_lengths, self.tok.eos_token_id)
        times, runs, profile = [], [], None
        constants = split_path(attention)[1].get("constants", ())
        try:
            with module_constants(constants):  # the path's kernel variant: baked into its graphs at capture
                for _ in range(self.repeats):
                    before = sampler_stats(sampler)
                    if self.cuda:
                        th.cuda.reset_peak_memory_stats()
                    out, t = timed(self.sync, model.generate, **inputs, **common, custom_generate=sampler)
                    times.append(round(t, 4))
                    runs.append(stats_delta(before, sampler_stats(sampler)))
                if self.profile:
                    from bench.diagnostics import profile_call

                    profile = profile_call(
                        lambda: model.generate(**inputs, **common, custom_generate=sampler),
                        self.sync,
                        self.cuda,
                        row.tokens,
                        top=PROFILE_TOP,
                    )
        finally:
            if hook:
                force_eos(sampler, None, self.tok.eos_token_id)
        self.shapes_seen.add((row.reasoning, attention, batch, row.tokens))
        completions = out[:, inputs["input_ids"].shape[1] :]
        lengths = completion_lengths(completions, [self.tok.eos_token_id])
        if eos_lengths is None:
            lengths = [row.tokens] * batch  # min_new_tokens: every row full length (EOS not possible)
        t = times[-1]
        floor_s = floor_seconds(wbytes, kv, prompt_lens, lengths, self.bandwidth) if self.bandwidth else None
        return {
            "batch": batch,
            "tokens": row.tokens,
            "run_s": times,
            "s": t,
            "ms_per_step": 1e3 * t / row.tokens,
            "completion_tokens": sum(lengths),
            "tokens_per_s": sum(lengths) / t,
            "floor_ms_per_step": 1e3 * floor_s / (max(lengths) - 1) if floor_s else None,
            "share_of_floor": floor_s / t if floor_s else None,
            "peak_gib": th.cuda.max_memory_allocated() / 2**30 if self.cuda else 0.0,
            "fast_path": bool(getattr(sampler, "last_used_fast_path", False)),
            "paths": session_paths(sampler),
            "sampler_stats_per_run": runs,
            "eos_hook": hook,
            "lengths_min_max": [min(lengths), max(lengths)],
            **({"profile": profile} if profile else {}),
        }


def run_row(bench: Bench, row: Row, attention) -> dict:
    """One row of the table (for eos-spread: the spread batch, the equal-token full batch and their ratio)."""
    t0 = time.perf_counter()
    result = {"row": row.name, "attention": attention or "default", "reasoning": row.reasoning}
    if not row.eos_spread:
        result.update(bench.run(row, attention, row.batch))
    else:
        sampler = bench.sampler(row.reasoning, attention)
        if force_eos(sampler, None, bench.tok.eos_token_id) is None:
            return {**result, "skipped": "the sampler has neither force_eos_at nor logits_hook"}
        lengths = spread_lengths(row.batch, row.tokens, 0.1, bench.seed)
        spread = bench.run(row, attention, row.batch, lengths)
        equal = max(1, round(spread["completion_tokens"] / row.tokens))
        full = bench.run(row, attention, equal, [row.tokens] * equal)
        result.update(spread)
        result["full"] = full
        result["ratio_to_full"] = spread["s"] / full["s"]
    result["row_s"] = round(time.perf_counter() - t0, 1)
    return result


# ------------------------------------------------------------------------------------------ the table
def _f(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(results: list[dict]) -> str:
    """The rows as a markdown table (and the EOS-spread ratio lines)."""
    lines = [
        "| row | attention | ms/step | tokens/s | floor ms | share of floor | peak GiB | runs (s) | row s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in results:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['row']} | {r['attention']} | {r.get('skipped') or r.get('error')} | | | | | | |")
            continue
        runs = ", ".join(f"{t:.1f}" for t in r["run_s"])
        lines.append(
            f"| {r['row']} | {r['attention']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{_f(r['floor_ms_per_step'], '.2f')} | {_f(r['share_of_floor'], '.0%')} | {r['peak_gib']:.1f} | "
            f"{runs} | {r['row_s']:.0f} |"
        )
        if "full" in r:
            f = r["full"]
            notes.append(
                f"- eos-spread ({r['attention']}): {r['batch']} rows, lengths {r['lengths_min_max'][0]}-"
                f"{r['lengths_min_max'][1]}, {r['completion_tokens']:,} tokens in {r['s']:.2f} s; "
                f"{f['batch']} rows x {f['tokens']:,} full = {f['completion_tokens']:,} tokens in {f['s']:.2f} s; "
                f"**ratio {r['ratio_to_full']:.2f}** (target <= 1.25; floor share spread "
                f"{_f(r['share_of_floor'], '.0%')}, full {_f(f['share_of_floor'], '.0%')})"
            )
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, help="row names (see above)")
    parser.add_argument("--attention", nargs="*", default=["triton", "eager"], help="sampler attention paths")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row (the first compiles; the last counts)")
    parser.add_argument("--bandwidth", type=float, default=None, help="copy bandwidth, bytes/s (default: measure)")
    parser.add_argument("--compile", choices=["on", "off", "auto"], default="auto", help="torch.compile the step")
    parser.add_argument("--deadline", type=float, default=None, help="unix time: skip rows that would end later")
    parser.add_argument("--out", default=None, help="JSON-lines file, one line per finished row")
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU (a smoke test)")
    parser.add_argument(
        "--profile", action="store_true", help="one more run per row under torch.profiler: top kernels, device busy"
    )
    args = parser.parse_args(argv)
    plan = plan_rows(args.rows, args.attention)

    import torch as th

    if not args.tiny and not th.cuda.is_available():
        raise SystemExit("bench.bench_sampler needs a CUDA device (or --tiny for a CPU smoke test)")
    try:  # many shapes in one process: let dynamo keep a compiled graph per shape
        th._dynamo.config.recompile_limit = 64
        th._dynamo.config.accumulated_recompile_limit = 4096
    except AttributeError:
        th._dynamo.config.cache_size_limit = 64
    bandwidth = args.bandwidth
    if bandwidth is None and not args.tiny:
        from bench.floor import copy_bandwidth

        bandwidth = copy_bandwidth()["bandwidth_Bps"]
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else "no bandwidth: no floor", flush=True)
    compile_flag = {"on": True, "off": False, "auto": None}[args.compile]
    bench = Bench(args.tiny, bandwidth, args.repeats, compile_flag, profile=args.profile)
    results = []
    has_option = sampler_options()["attention"]
    for row, wanted in plan:
        attention = wanted if has_option else None
        label = wanted if has_option else "eager (only path)"
        base, options = split_path(wanted)
        missing = [k for k in options if k != "constants" and not sampler_options()[k]]
        if not has_option and wanted != "eager":
            result = {"row": row.name, "attention": wanted, "skipped": "this sampler has no attention= option"}
        elif missing:
            result = {"row": row.name, "attention": wanted, "skipped": f"this sampler has no {missing[0]}= option"}
        elif base == "triton" and importlib.util.find_spec("triton") is None:
            result = {"row": row.name, "attention": wanted, "skipped": "Triton is not installed"}
        else:
            from bench.floor import floor_ms_per_step

            _, _, wbytes, kv = bench.model(row.reasoning)
            floor = floor_ms_per_step(wbytes, kv, row.batch, 68 + row.tokens / 2, bandwidth or 4e12)
            new_compile, new_shape = bench.needs_compile(row, attention), bench.is_new_shape(row, attention)
            need = estimate_s(row, floor, args.repeats, new_compile, new_shape)
            left = (args.deadline - time.time()) if args.deadline else float("inf")
            if need > left:
                result = {"row": row.name, "attention": label, "skipped": f"needs ~{need:.0f} s, {left:.0f} s left"}
            else:
                try:
                    result = run_row(bench, row, attention)
                    result["attention"] = label
                except Exception as err:  # noqa: BLE001 - record it, go on with the next row
                    result = {"row": row.name, "attention": label, "error": repr(err)[:300]}
                    if th.cuda.is_available():
                        th.cuda.empty_cache()
                result["estimate_s"] = round(need, 1)
        results.append(result)
        print("\n".join(markdown([result]).splitlines()[2:]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result, default=str) + "\n")
    print("\n" + markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
