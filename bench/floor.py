"""The memory-bandwidth floor of a decode step, and the machine's copy bandwidth and bf16 matmul rate.

A decode step must read every weight once and the KV cache of every live row up to its current length, so

    floor per step = (weight bytes + sum over live rows of context x KV bytes per token) / copy bandwidth

(logits, sampling and the prefill are left out: under 2% of the bytes at the benchmark's shapes). For
Qwen3-0.6B, KV bytes per token = 28 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes = 112 KiB, and the
weights are ~1.19 GB in bf16 (the tied embedding counted once: it is read once, as the output head).

Bandwidth is measured as a device-to-device copy of ``--gib`` GiB: bytes read + bytes written over the time
(CUDA events), the median of ``--repeats`` copies after warm-up. The matmul rate is a bf16 ``n x n x n``
matmul, 2 n^3 FLOPs over the median time.

    python -m bench.floor --out bench/results/floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics


# ------------------------------------------------------------------------------------------ the model
def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token occupies in the cache, over all layers.

    Example:
        >>> kv_bytes_per_token(28, 8, 128) // 1024  # Qwen3-0.6B, bf16: KiB
        112
    """
    return num_layers * kv_heads * head_dim * 2 * dtype_bytes


def model_kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """``kv_bytes_per_token`` of a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return kv_bytes_per_token(config.num_hidden_layers, kv_heads, head_dim, dtype_bytes)


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter once (tied ones once), minus an untied input
    embedding (a step reads only B of its rows)."""
    params = list(model.parameters())  # shared (tied) parameters appear once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not embedding
    return sum(p.numel() * p.element_size() for p in params if not (untied and p is embedding))


def floor_seconds(
    weight_bytes: int, kv_per_token: int, prompt_lens: list[int], lengths: list[int], bandwidth: float
) -> float:
    """Floor of a whole decode loop: ``max(lengths) - 1`` steps, row i live while it has tokens to make.

    Step t (t = 1 .. n-1) reads the weights and, for each row with ``lengths[i] > t``, its context
    ``prompt_lens[i] + t`` tokens of KV. ``bandwidth`` in bytes/s (read + written, as ``copy_bandwidth``).

    Example:
        >>> round(floor_seconds(10**9, 100, [10], [3], 10**12) * 1e3, 6)  # 2 steps: 1 GB + 11 and 12 tokens
        2.000002
    """
    steps = max(lengths) - 1
    total = weight_bytes * steps
    for p, n in zip(prompt_lens, lengths, strict=True):
        live = n - 1  # steps t = 1 .. n-1 make tokens 2 .. n of this row
        total += kv_per_token * (live * p + live * (live + 1) // 2)
    return total / bandwidth


def floor_ms_per_step(
    weight_bytes: int, kv_per_token: int, batch: int, mean_context: float, bandwidth: float
) -> float:
    """Floor of one decode step at a mean context (the issue's formula), in ms.

    Example:
        >>> round(floor_ms_per_step(1.19e9, 114688, 256, 66 + 512, 4.27e12), 2)  # 256 x 1,024 on the H200
        4.25
    """
    return (weight_bytes + batch * mean_context * kv_per_token) / bandwidth * 1e3


# ------------------------------------------------------------------------------------------ measurements
def copy_bandwidth(gib: float = 2.0, repeats: int = 20, warmup: int = 3) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second), median over ``repeats`` copies."""
    import torch as th

    n = int(gib * 2**30)
    src = th.empty(n, dtype=th.uint8, device="cuda")
    dst = th.empty_like(src)
    times = []
    for i in range(warmup + repeats):
        start, end = th.cuda.Event(enable_timing=True), th.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    th.cuda.empty_cache()
    t = statistics.median(times)
    return {"bandwidth_Bps": 2 * n / t, "copy_bytes": n, "median_s": t, "min_s": min(times), "repeats": repeats}


def matmul_rate(n: int = 8192, repeats: int = 20, warmup: int = 3) -> dict:
    """bf16 matmul FLOP/s (2 n^3 per ``n x n`` by ``n x n``), median over ``repeats``."""
    import torch as th

    a = th.randn(n, n, device="cuda", dtype=th.bfloat16)
    b = th.randn(n, n, device="cuda", dtype=th.bfloat16)
    times = []
    for i in range(warmup + repeats):
        start, end = th.cuda.Event(enable_timing=True), th.cuda.Event(enable_timing=True)
        start.record()
        th.mm(a, b)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    th.cuda.empty_cache()
    t = statistics.median(times)
    return {"bf16_flops": 2 * n**3 / t, "n": n, "median_s": t, "repeats": repeats}


def qwen3_weight_bytes(vocab_size: int | None = None) -> int:
    """Decode-step weight bytes of the Qwen3-0.6B shape in bf16 (counted on the meta device, no memory)."""
    import torch as th
    from transformers import AutoModelForCausalLM, Qwen3Config

    from bench.workload import QWEN3_06B

    shape = {**QWEN3_06B, **({"vocab_size": vocab_size} if vocab_size else {})}
    with th.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**shape), dtype=th.bfloat16)
    return weight_bytes(model)


def markdown(result: dict) -> str:
    """The floor piece's result as markdown (bandwidth, matmul rate, floor per benchmark row)."""
    lines = [
        f"- copy bandwidth (read + write): **{result['bandwidth_Bps'] / 1e12:.2f} TB/s** "
        f"({result['copy']['copy_bytes'] / 2**30:.1f} GiB copies, median of {result['copy']['repeats']})",
        f"- bf16 matmul ({result['matmul']['n']}^3): **{result['bf16_flops'] / 1e12:.0f} TFLOP/s** measured; "
        f"stated peak {result['stated_peak_flops'] / 1e12:.0f} TFLOP/s"
        if result.get("stated_peak_flops")
        else f"- bf16 matmul: **{result['bf16_flops'] / 1e12:.0f} TFLOP/s** measured (no stated peak for this device)",
        f"- weights read per step: {result['weight_bytes'] / 1e9:.3f} GB (vocabulary doubled: "
        f"{result['weight_bytes_rv'] / 1e9:.3f} GB); KV per token {result['kv_bytes_per_token'] / 1024:.0f} KiB",
        "",
        "| batch x tokens | mean context | floor ms/step |",
        "|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['batch']} x {row['tokens']:,} | {row['mean_context']:.0f} | {row['floor_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0, help="size of each copy (GiB)")
    parser.add_argument("--repeats", type=int, default=20, help="timed copies / matmuls (median)")
    parser.add_argument("--matmul-n", type=int, default=8192, help="matmul size n (n x n x n)")
    parser.add_argument("--out", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)

    import torch as th

    from bench.workload import QWEN3_06B, VOCAB, stated_peak, write_json

    if not th.cuda.is_available():
        raise SystemExit("bench.floor needs a CUDA device (it measures the GPU's memory bandwidth)")
    copy = copy_bandwidth(args.gib, args.repeats)
    mm = matmul_rate(args.matmul_n, args.repeats)
    kv = kv_bytes_per_token(QWEN3_06B["num_hidden_layers"], QWEN3_06B["num_key_value_heads"], QWEN3_06B["head_dim"])
    weights, weights_rv = qwen3_weight_bytes(), qwen3_weight_bytes(2 * VOCAB)
    name = th.cuda.get_device_name()
    prompt = sum(p + 4 for p in (48, 80)) / 2  # mean prompt tokens of the benchmark's prompts
    rows = []
    for batch, tokens in [(32, 512), (32, 4096), (128, 1024), (256, 1024), (32, 8192)]:
        ctx = prompt + tokens / 2
        rows.append(
            {
                "batch": batch,
                "tokens": tokens,
                "mean_context": ctx,
                "floor_ms": floor_ms_per_step(weights, kv, batch, ctx, copy["bandwidth_Bps"]),
            }
        )
    result = {
        "device": name,
        "torch": th.__version__,
        "bandwidth_Bps": copy["bandwidth_Bps"],
        "bf16_flops": mm["bf16_flops"],
        "stated_peak_flops": stated_peak(name),
        "copy": copy,
        "matmul": mm,
        "weight_bytes": weights,
        "weight_bytes_rv": weights_rv,
        "kv_bytes_per_token": kv,
        "rows": rows,
    }
    print(markdown(result), flush=True)
    if args.out:
        write_json(args.out, result)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
