"""Where a decode step's time goes, part by part: the attention kernel's launch choices and the layers' GEMMs.

    python -m bench.decode_parts --out parts.json                  # both parts, the Qwen3-0.6B shapes
    python -m bench.decode_parts --parts attention --rows 256x1024
    python -m bench.decode_parts --tiny                            # CPU smoke test (GEMMs only, tiny shapes)

Each op is timed as the sampler runs it: ``--launches`` launches captured in one CUDA graph, the graph replayed
``--repeats`` times, the median replay over the launches (on the CPU: a plain loop). Inputs are random (never
zeros), rotated among enough copies that the bytes of one graph exceed the L2 cache several times.

* ``attention``: ``triton_decode.decode_attention`` on a batch x new-tokens row (``32x512``: 32 rows at the mean
  context of a 512-token completion, 68 + 256 slots, in a cache of the sampler's length) for every block size x
  warps x pipeline stages x context splits x peel (the first cache block loaded before the query's work) of
  ``GRID``, in the sampler's form (raw q/k with Qwen3's q/k norm and RoPE in the kernel; at <= 64 rows the input
  norm folded in, ``norm_fold``); the sampler's default is marked. Every row has 16 slots
  of left padding (prompts of 68 tokens padded to 84), which the kernel skips (``start``). Bytes = the K and V
  slots read (rows x KV heads x (context - padding) x head dim x 2 x 2 bytes) + the query, the new K/V and the
  output; GB/s = bytes / time, and the share of ``--bandwidth`` (the copy bandwidth, measured when not given).
  The eager maths (``attention.eager_decode_attention``, the plain form) are timed alongside; each configuration's
  error is against the grid's first.
* ``gemm``: the decoder layer's linear maps at M = the batch, apart (q, k, v, o, gate, up, down) and fused
  (qkv, gate_up), and the output head; time, GB/s of the weight read, and the per-layer sums of both ways.
* ``linear`` / ``gated``: ``triton_linear``'s kernels over a grid against cuBLAS (``gated``: the MLP's gate/up GEMM
  and SiLU x up in one kernel, the post-attention norm folded in, against the GEMM and ``norm_fold.silu_mul``).
* ``pick``: the token pick of one step (temperature 1, EOS stop, sampled) on [batch, V] bf16 logits, for
  ``--batches`` and the vocabulary as it is and doubled: ``state.pick`` with the PyTorch ops (compiled, with the
  [B, V] Exp(1) draw it needs) against the Triton kernels of ``triton_pick``; GB/s of the logits read.

``--grid block=32,64 splits=1,2,4`` replaces those entries of the attention grid.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from bench.bench_sampler import parse_row
from bench.workload import QWEN3_06B, TINY

PROMPT_MEAN = 68  # the benchmark prompts' mean length (52-84 tokens)
PROMPT_MAX = 84
GRID = dict(block=(32, 64, 128), warps=(4, 8), stages=(2, 3, 4), splits=(1, 2, 4, 8, 16, 32), peel=(0, 1))
GRID_KEYS = ("block", "warps", "stages", "splits", "peel")


def parse_grid(entries: list[str]) -> dict:
    """``GRID`` with the given ``key=v1,v2`` entries replaced.

    Example:
        >>> parse_grid(["splits=1,2", "block=64"])["splits"], parse_grid(["block=64"])["block"]
        ((1, 2), (64,))
    """
    grid = dict(GRID)
    for entry in entries:
        key, _, values = entry.partition("=")
        if key not in GRID or not values:
            raise SystemExit(f"--grid {entry!r}: want KEY=V1,V2 with KEY one of {sorted(GRID)}")
        grid[key] = tuple(int(v) for v in values.split(","))
    return grid


def shape_of(tiny: bool) -> dict:
    s = {**QWEN3_06B, **(TINY if tiny else {})}
    return dict(
        hidden=s["hidden_size"],
        mlp=s["intermediate_size"],
        heads=s["num_attention_heads"],
        kv_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        vocab=512 if tiny else s["vocab_size"],
        layers=s["num_hidden_layers"],
    )


def cache_len_of(tokens: int) -> int:
    """The sampler's cache length for a benchmark row: prompt + new tokens, rounded up to 256 slots.

    Example:
        >>> cache_len_of(512), cache_len_of(1024), cache_len_of(4096)
        (768, 1280, 4352)
    """
    from rlvr_vocab.sampling.sampler import CACHE_ROUND

    return -(-(PROMPT_MAX + tokens) // CACHE_ROUND) * CACHE_ROUND


def time_op(fn, cuda: bool, launches: int, repeats: int) -> float:
    """Seconds per call of ``fn(i)`` (i = the call's index, to rotate inputs): CUDA graph of ``launches`` calls."""
    import torch as th

    if not cuda:
        fn(0)
        t0 = time.perf_counter()
        for i in range(launches):
            fn(i)
        return (time.perf_counter() - t0) / launches
    stream = th.cuda.Stream()
    stream.wait_stream(th.cuda.current_stream())
    with th.cuda.stream(stream):
        for i in range(2):
            fn(i)
    th.cuda.current_stream().wait_stream(stream)
    graph = th.cuda.CUDAGraph()
    with th.cuda.graph(graph):
        for i in range(launches):
            fn(i)
    graph.replay()
    th.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = th.cuda.Event(enable_timing=True), th.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return statistics.median(times)


def copies_for(nbytes: int, l2_bytes: int = 60 * 2**20, at_least: int = 2, at_most: int = 8) -> int:
    """How many input copies to rotate among so that one pass over them is >= 4x the L2 cache.

    Example:
        >>> copies_for(2**30), copies_for(10 * 2**20)
        (2, 8)
    """
    return max(at_least, min(at_most, -(-4 * l2_bytes // max(nbytes, 1))))


# ------------------------------------------------------------------------------------------ attention
def attention_rows(args, shape: dict, cuda: bool, bandwidth: float | None) -> list[dict]:
    results = []
    for name in args.rows:
        results += attention_row(name, args, shape, cuda, bandwidth)
        print(attention_table([r for r in results if r["row"] == name]), flush=True)
    return results


def attention_row(name: str, args, shape: dict, cuda: bool, bandwidth: float | None) -> list[dict]:
    """Every configuration of the grid (and the eager maths) on one row's shape."""
    import torch as th

    from rlvr_vocab.sampling import triton_decode
    from rlvr_vocab.sampling.attention import decode_mask, eager_decode_attention

    device = "cuda" if cuda else "cpu"
    dtype = th.bfloat16 if cuda else th.float32
    row = parse_row(name)
    b, hkv, h, d = row.batch, shape["kv_heads"], shape["heads"], shape["head_dim"]
    cache_len = cache_len_of(row.tokens)
    pad = PROMPT_MAX - PROMPT_MEAN  # every row's left padding (the kernel skips it; the floor does not count it)
    length = PROMPT_MAX + row.tokens // 2
    kv_bytes = b * hkv * (length - pad) * d * 2 * dtype.itemsize
    io_bytes = (2 * b * h * d + 2 * b * hkv * d) * dtype.itemsize
    copies = copies_for(kv_bytes)
    gen = th.Generator(device=device).manual_seed(0)

    def rand(*s):
        return th.randn(*s, generator=gen, device=device, dtype=th.float32).to(dtype)

    bias = th.zeros(b, cache_len, device=device)
    bias[:, :pad] = float("-inf")
    start = th.full((b,), pad, dtype=th.int32, device=device)
    sets = [
        dict(
            q=rand(b, 1, h, d).transpose(1, 2),
            kn=rand(b, 1, hkv, d).transpose(1, 2),
            vn=rand(b, 1, hkv, d).transpose(1, 2),
            k=rand(b, hkv, cache_len, d),
            v=rand(b, hkv, cache_len, d),
        )
        for _ in range(copies)
    ]
    n = th.tensor([length], device=device)
    scale = d**-0.5
    default = (
        triton_decode.BLOCK_N,
        triton_decode.NUM_WARPS,
        triton_decode.NUM_STAGES,
        triton_decode.num_splits(b * hkv, cache_len, th.device(device)),
        int(triton_decode.PEEL),
    )
    angle = th.rand(b, d // 2, generator=gen, device=device) * 100
    cos, sin = (f(th.cat([angle, angle], -1)).to(dtype) for f in (th.cos, th.sin))
    rope = (cos, sin, (1 + rand(h + hkv, d) * 0.3).contiguous(), 1e-6)
    fold = (th.rand(b, 64, generator=gen, device=device) * 20, 1024, 1e-6, None) if b <= 64 else None
    base = dict(row=name, batch=b, cache_len=cache_len, length=length, kv_bytes=kv_bytes, copies=copies)
    mask = decode_mask(bias, n, -(-length // 128) * 128, hkv, dtype)

    def eager(i):
        x = sets[i % copies]
        return eager_decode_attention(x["q"], x["kn"], x["vn"], x["k"], x["v"], n, mask, scale)

    t = time_op(eager, cuda, args.launches, args.repeats)
    results = [_attention_result(base, "eager", None, t, kv_bytes + io_bytes, bandwidth)]
    if triton_decode.triton is None or not cuda:  # Triton's CPU interpreter: too slow to time
        return results
    grid = parse_grid(args.grid)
    want = None
    for values in itertools.product(*(grid[k] for k in GRID_KEYS)):
        config = dict(zip(GRID_KEYS, values, strict=True))
        if config["splits"] > 1 and (config["splits"] - 1) * config["block"] >= length - pad:  # nothing to read
            continue
        config["default"] = values == default

        def run(i, config=config):
            x = sets[i % copies]
            return triton_decode.decode_attention(
                x["q"], x["kn"], x["vn"], x["k"], x["v"], n, bias, scale, config["splits"], config["block"],
                config["warps"], config["stages"], start=start, rope=rope, fold=fold, peel=bool(config["peel"]),
            )  # fmt: skip

        try:
            got = run(0).float()
            want = got if want is None else want  # the grid's first configuration is the reference
            error = float((got - want).abs().max() / want.abs().max())
            t = time_op(run, cuda, args.launches, args.repeats)
        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: record, go on
            results.append({**base, "impl": "triton", **config, "error": repr(err)[:200]})
            continue
        r = _attention_result(base, "triton", config, t, kv_bytes + io_bytes, bandwidth)
        r["max_rel_error"] = error
        results.append(r)
    return results


def _attention_result(base: dict, impl: str, config: dict | None, t: float, nbytes: int, bandwidth) -> dict:
    return {
        **base,
        "impl": impl,
        **(config or {}),
        "us": t * 1e6,
        "GBps": nbytes / t / 1e9,
        "share_of_bandwidth": nbytes / t / bandwidth if bandwidth else None,
    }


def attention_table(results: list[dict], top: int = 8) -> str:
    """The eager row, the default config and the ``top`` fastest Triton configs of each row."""
    lines = ["| row | impl | block | warps | stages | splits | peel | us | GB/s | share | note |", "|" + "---|" * 11]
    for name in dict.fromkeys(r["row"] for r in results):
        rows = [r for r in results if r["row"] == name and "us" in r]
        triton_rows = sorted((r for r in rows if r["impl"] == "triton"), key=lambda r: r["us"])
        default = [r for r in triton_rows if r["default"]]
        shown = [r for r in rows if r["impl"] == "eager"] + default + triton_rows[:top]
        for r in shown:
            share = "" if r["share_of_bandwidth"] is None else f"{r['share_of_bandwidth']:.0%}"
            note = "the default" if r in default else ""
            cfg = [str(r.get(k, "")) for k in GRID_KEYS]
            lines.append(
                f"| {name} | {r['impl']} | {' | '.join(cfg)} | {r['us']:.1f} | {r['GBps']:.0f} | {share} | {note} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the pick
def pick_rows(args, shape: dict, cuda: bool, bandwidth: float | None) -> list[dict]:
    """``state.pick`` per step with the PyTorch ops and with the Triton kernels, on the same logits."""
    import torch as th

    from rlvr_vocab.sampling import triton_pick
    from rlvr_vocab.sampling.plan import Plan
    from rlvr_vocab.sampling.state import DecodeState, pick

    device = "cuda" if cuda else "cpu"
    dtype = th.bfloat16 if cuda else th.float32
    results = []
    impls = ["torch"] + (["triton"] if triton_pick.triton is not None and cuda else [])
    for m in args.batches:
        for vocab in (shape["vocab"], 2 * shape["vocab"]):
            nbytes = m * vocab * dtype.itemsize
            copies = copies_for(nbytes)
            logits = [th.randn(m, vocab, device=device, dtype=dtype) * 3 for _ in range(copies)]
            plan = Plan(eos_ids=(0,), pad_id=1, max_length=4096)
            ids = th.ones(m, 4, dtype=th.long, device=device)
            for impl in impls:
                st = DecodeState(m, 4096, th.device(device))
                st.start(plan, ids, th.ones_like(ids), th.arange(4, device=device).expand(m, 4), vocab, None, impl)
                t = st.tensors()

                def one(x, t, plan=plan, impl=impl):
                    pick(plan, x, t, impl)

                step = th.compile(one, dynamic=False) if cuda else one

                def run(i, st=st, t=t, step=step, logits=logits):
                    st.step.zero_()  # stay inside the output buffers
                    st.draw_noise()
                    step(logits[i % len(logits)], t)

                us = time_op(run, cuda, args.launches, args.repeats) * 1e6
                gbps = nbytes / us / 1e3
                share = gbps * 1e9 / bandwidth if bandwidth else None
                results.append(dict(batch=m, vocab=vocab, impl=impl, us=us, GBps=gbps, share_of_bandwidth=share))
    print(pick_table(results), flush=True)
    return results


def pick_table(results: list[dict]) -> str:
    lines = ["| batch | vocabulary | pick | us | GB/s of the logits | share |", "|---|---|---|---|---|---|"]
    for r in results:
        share = "" if r["share_of_bandwidth"] is None else f"{r['share_of_bandwidth']:.0%}"
        lines.append(f"| {r['batch']} | {r['vocab']:,} | {r['impl']} | {r['us']:.1f} | {r['GBps']:.0f} | {share} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ GEMMs
def gemm_maps(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear map of one decoder layer, apart and fused, and of the head."""
    h, m = shape["hidden"], shape["mlp"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    return {
        "q": (h, q),
        "k": (h, kv),
        "v": (h, kv),
        "o": (q, h),
        "gate": (h, m),
        "up": (h, m),
        "down": (m, h),
        "qkv": (h, q + 2 * kv),
        "gate_up": (h, 2 * m),
        "head": (h, shape["vocab"]),
    }


def gemm_rows(args, shape: dict, cuda: bool, bandwidth: float | None) -> list[dict]:
    import torch as th

    device = "cuda" if cuda else "cpu"
    dtype = th.bfloat16 if cuda else th.float32
    results = []
    for m in args.batches:
        for name, (k, n) in gemm_maps(shape).items():
            nbytes = k * n * dtype.itemsize
            copies = copies_for(nbytes)
            ws = [th.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
            x = th.randn(m, k, device=device, dtype=dtype)

            def run(i, ws=ws, x=x):
                return th.nn.functional.linear(x, ws[i % len(ws)])

            t = time_op(run, cuda, args.launches, args.repeats)
            moved = nbytes + (m * k + m * n) * dtype.itemsize
            results.append(
                dict(
                    batch=m,
                    map=name,
                    features=[k, n],
                    us=t * 1e6,
                    GBps=moved / t / 1e9,
                    share_of_bandwidth=moved / t / bandwidth if bandwidth else None,
                )
            )
            if cuda and name in SKINNY_MAPS:
                results += skinny_rows(m, name, x, ws, moved, args, bandwidth)
    print(gemm_table(results), flush=True)
    return results


SKINNY_MAPS = ("qkv", "o", "gate_up", "down")
SKINNY_GRID = dict(block_n=(16, 32, 64), block_k=(128, 256), stages=(3, 5))


def skinny_rows(m: int, name: str, x, ws, moved: int, args, bandwidth) -> list[dict]:
    """``bench.skinny_gemm`` on one map (gate_up: ``silu_mul``, against cuBLAS's GEMM plus torch's SiLU x up)."""
    import torch as th

    from bench import skinny_gemm as triton_gemm

    if triton_gemm.triton is None or m > triton_gemm.MAX_ROWS:
        return []
    out = []
    if name == "gate_up":

        def eager(i):
            gate, up = th.nn.functional.linear(x, ws[i % len(ws)]).chunk(2, dim=-1)
            return th.nn.functional.silu(gate) * up

        t = time_op(eager, True, args.launches, args.repeats)
        out.append(dict(batch=m, map="gate_up+silu_mul", impl="cublas+torch", us=t * 1e6))
    want = eager(0) if name == "gate_up" else th.nn.functional.linear(x, ws[0])
    fn = triton_gemm.silu_mul if name == "gate_up" else triton_gemm.linear
    for block_n, block_k, stages in itertools.product(*SKINNY_GRID.values()):
        cfg = dict(block_n=block_n, block_k=block_k, num_stages=stages)

        def run(i, cfg=cfg):
            return fn(x, ws[i % len(ws)], **cfg)

        try:
            error = float((run(0).float() - want.float()).abs().max() / want.float().abs().max())
            t = time_op(run, True, args.launches, args.repeats)
        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: record, go on
            out.append(dict(batch=m, map=name, impl="triton", **cfg, error=repr(err)[:200]))
            continue
        share = moved / t / bandwidth if bandwidth else None
        label = "gate_up+silu_mul" if name == "gate_up" else name
        out.append(
            dict(batch=m, map=label, impl="triton", **cfg, us=t * 1e6, share_of_bandwidth=share, max_rel_error=error)
        )
    best = min((r for r in out if r["impl"] == "triton" and "us" in r), key=lambda r: r["us"], default=None)
    if best:
        print(f"batch {m} {name}: triton best {best['us']:.1f} us { ({k: best[k] for k in cfg}) }", flush=True)
    return out


LINEAR_MAPS = {"o": True, "down": True, "qkv": False, "gate_up": False}  # map -> with the residual add (as run)
LINEAR_GRID = dict(block_n=(16, 32, 64), block_k=(128, 256), warps=(4,), stages=(3,), split_k=(1, 2, 4, 8))


def linear_rows(args, shape: dict, cuda: bool, bandwidth: float | None) -> list[dict]:
    """``triton_linear`` on ``--maps`` (o and down in the fused layers' form, the residual added; qkv and gate_up
    plain, as they would run with the norms folded), over ``LINEAR_GRID``, against cuBLAS's GEMM alone and against
    the torch ops it replaces (the GEMM, with cuBLAS's split-K reduce where it splits, and the residual add)."""
    import torch as th
    import torch.nn.functional as F

    from rlvr_vocab.sampling import triton_linear

    device = "cuda" if cuda else "cpu"
    dtype = th.bfloat16 if cuda else th.float32
    results = []
    for m in [b for b in args.batches if b <= triton_linear.MAX_ROWS]:
        for name in args.maps:
            k, n = gemm_maps(shape)[name]
            nbytes = k * n * dtype.itemsize
            ws = [th.randn(n, k, device=device, dtype=dtype) * k**-0.5 for _ in range(copies_for(nbytes))]
            x = th.randn(m, k, device=device, dtype=dtype)
            kwargs = {"residual": th.randn(m, n, device=device, dtype=dtype)} if LINEAR_MAPS[name] else {}
            moved = nbytes + (m * k + 2 * m * n) * dtype.itemsize
            t = time_op(lambda i, ws=ws, x=x: F.linear(x, ws[i % len(ws)]), cuda, args.launches, args.repeats)
            results.append(dict(batch=m, map=name, impl="cublas (GEMM alone)", us=t * 1e6))

            def eager(i, ws=ws, kwargs=kwargs, x=x):
                return triton_linear.reference(x, ws[i % len(ws)], **kwargs)

            t = time_op(eager, cuda, args.launches, args.repeats)
            results.append(dict(batch=m, map=name, impl="torch ops (what it replaces)", us=t * 1e6))
            want = triton_linear.reference(x, ws[0], **kwargs).float()
            default = triton_linear.block_config(n, k)
            kwargs["work"] = triton_linear.workspace(x.device, n)
            configs = list(itertools.product(*LINEAR_GRID.values()))
            configs += [default] * (default not in configs)
            for config in configs:

                def run(i, config=config, ws=ws, x=x, kwargs=kwargs):
                    return triton_linear.linear(x, ws[i % len(ws)], **kwargs, config=config)

                label = dict(batch=m, map=name, impl="triton", config=list(config))
                try:
                    error = float((run(0).float() - want).abs().max() / want.abs().max())
                    t = time_op(run, cuda, args.launches, args.repeats)
                except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                    results.append(dict(label, error=repr(err)[:200]))
                    continue
                share = moved / t / bandwidth if bandwidth else None
                results.append(dict(label, us=t * 1e6, share_of_bandwidth=share, max_rel_error=error,
                                    default=config == default))  # fmt: skip
    print(linear_table(results), flush=True)
    return results


GATED_GRID = dict(block_n=(16, 32), block_k=(64, 128, 256), warps=(2, 4, 8), stages=(2, 3, 4))


def gated_rows(args, shape: dict, cuda: bool, bandwidth: float | None) -> list[dict]:
    """The MLP's gate/up and SiLU x up with the post-attention norm folded in (the sampler's form at <= 64 rows):
    the cuBLAS GEMM then ``norm_fold.silu_mul``'s kernel (two kernels, as the sampler runs them), against
    ``triton_linear.gated`` (one kernel) over ``GATED_GRID``; the cuBLAS GEMM alone for reference."""
    import torch as th
    import torch.nn.functional as F

    from rlvr_vocab.sampling import norm_fold, triton_linear

    device = "cuda" if cuda else "cpu"
    dtype = th.bfloat16 if cuda else th.float32
    impl = "triton" if cuda else "torch"
    k, n = gemm_maps(shape)["gate_up"]
    results = []
    for m in [b for b in args.batches if b <= triton_linear.MAX_ROWS]:
        nbytes = k * n * dtype.itemsize
        ws = [th.randn(n, k, device=device, dtype=dtype) * k**-0.5 for _ in range(copies_for(nbytes))]
        x = th.randn(m, k, device=device, dtype=dtype) * 3
        ss = x.float().pow(2).reshape(m, triton_linear.ss_blocks(k, k), -1).sum(-1).contiguous()  # as o leaves them
        fold = dict(ss=ss, hidden=k, eps=1e-6)
        label = dict(batch=m, map="gated")

        def two(i, ws=ws, x=x, ss=ss):
            return norm_fold.silu_mul(F.linear(x, ws[i % len(ws)]), ss, k, 1e-6, impl=impl)

        for name, fn in {"cublas (GEMM alone)": lambda i, ws=ws, x=x: F.linear(x, ws[i % len(ws)]),
                         "cublas + silu_mul (as run)": two}.items():  # fmt: skip
            results.append(dict(label, impl=name, us=time_op(fn, cuda, args.launches, args.repeats) * 1e6))
        want = two(0).float()
        configs = list(itertools.product(*GATED_GRID.values()))
        configs += [triton_linear.GATED_CONFIG] * (triton_linear.GATED_CONFIG not in configs)
        for config in configs if cuda else [triton_linear.GATED_CONFIG]:

            def run(i, config=config, ws=ws, x=x, fold=fold):
                return triton_linear.gated(x, ws[i % len(ws)], **fold, config=config)

            row = dict(label, impl="triton gated", config=list(config))
            try:
                error = float((run(0).float() - want).abs().max() / want.abs().max())
                t = time_op(run, cuda, args.launches, args.repeats)
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                results.append(dict(row, error=repr(err)[:200]))
                continue
            share = (nbytes + m * (k + n // 2) * dtype.itemsize) / t / bandwidth if bandwidth else None
            results.append(dict(row, us=t * 1e6, share_of_bandwidth=share, max_rel_error=error,
                                default=config == triton_linear.GATED_CONFIG))  # fmt: skip
    print(linear_table(results, "(block_n, block_k, warps, stages)"), flush=True)
    return results


def linear_table(results: list[dict], config: str = "(block_n, block_k, warps, stages, split_k)") -> str:
    lines = [f"| batch | map | impl | config {config} | us | max rel error |"]
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        us = f"{r['us']:.1f}" if "us" in r else r.get("error", "")
        err = f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else ""
        mark = " (default)" if r.get("default") else ""
        lines.append(f"| {r['batch']} | {r['map']} | {r['impl']} | {r.get('config', '')}{mark} | {us} | {err} |")
    return "\n".join(lines)


def gemm_table(results: list[dict]) -> str:
    lines = ["| batch | map | in x out | us | GB/s | share |", "|---|---|---|---|---|---|"]
    for r in results:
        if "impl" in r:  # the skinny-GEMM comparisons: printed as they run
            continue
        share = "" if r["share_of_bandwidth"] is None else f"{r['share_of_bandwidth']:.0%}"
        k, n = r["features"]
        lines.append(f"| {r['batch']} | {r['map']} | {k} x {n} | {r['us']:.1f} | {r['GBps']:.0f} | {share} |")
    for m in dict.fromkeys(r["batch"] for r in results):
        us = {r["map"]: r["us"] for r in results if r["batch"] == m and "impl" not in r}
        apart = sum(us[k] for k in ("q", "k", "v", "o", "gate", "up", "down"))
        fused = us["qkv"] + us["o"] + us["gate_up"] + us["down"]
        lines.append(f"\nbatch {m}: one layer's GEMMs {apart:.1f} us apart, {fused:.1f} us with qkv and gate_up fused")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        nargs="*",
        default=["attention", "gemm", "pick"],
        choices=["attention", "gemm", "pick", "linear", "gated"],
    )
    parser.add_argument("--grid", nargs="*", default=[], help="attention grid entries, e.g. block=32,64 splits=1,2")
    parser.add_argument("--rows", nargs="*", default=["32x512", "256x1024", "32x4096"], help="attention rows, BxL")
    parser.add_argument("--batches", nargs="*", type=int, default=[32, 256], help="GEMM rows (M)")
    parser.add_argument("--maps", nargs="*", default=list(LINEAR_MAPS), choices=list(LINEAR_MAPS), help="linear maps")
    parser.add_argument("--launches", type=int, default=20, help="launches per captured graph")
    parser.add_argument("--repeats", type=int, default=10, help="graph replays; the median counts")
    parser.add_argument("--bandwidth", type=float, default=None, help="copy bandwidth, bytes/s (default: measure)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke test)")
    parser.add_argument("--out", default=None, help="JSON file with every measurement")
    args = parser.parse_args(argv)
    grid = parse_grid(args.grid)

    import torch as th

    cuda = th.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("bench.decode_parts needs a CUDA device (or --tiny for a CPU smoke test)")
    if args.tiny:
        args.rows = [f"2x{parse_row(r).tokens // 64 or 8}" for r in args.rows]
        args.batches = [2]
        args.launches, args.repeats = 2, 1
    bandwidth = args.bandwidth
    if bandwidth is None and cuda:
        from bench.floor import copy_bandwidth

        bandwidth = copy_bandwidth()["bandwidth_Bps"]
    shape = shape_of(args.tiny)
    record = {"bandwidth_Bps": bandwidth, "shape": shape, "grid": grid}
    if cuda:
        record["device"] = th.cuda.get_device_name()
    if "attention" in args.parts:
        record["attention"] = attention_rows(args, shape, cuda, bandwidth)
    if "gemm" in args.parts:
        record["gemm"] = gemm_rows(args, shape, cuda, bandwidth)
    if "pick" in args.parts:
        record["pick"] = pick_rows(args, shape, cuda, bandwidth)
    if "linear" in args.parts:
        record["linear"] = linear_rows(args, shape, cuda, bandwidth)
    if "gated" in args.parts:
        record["gated"] = gated_rows(args, shape, cuda, bandwidth)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    if "attention" in record:
        print("\n" + attention_table(record["attention"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
