"""Flash-decoding in Triton: one query token per row against the static KV cache, split over the context.

One decode step of one layer is one or two kernels:

* ``_split_kernel``, grid ``(B * Hkv, S)``: program ``(b, kv head, split)`` reads its slice of the cache once,
  block by block, and serves all ``G = H / Hkv`` query heads of its KV head group (GQA fused: the ``G`` query
  rows are the rows of one ``tl.dot``, padded to 16). The valid length is read from a device tensor, and the
  ``S`` splits divide ``[first, length)`` evenly at every step (``first``: the row's first slot after its left
  padding, which is never read), so one captured CUDA graph serves every length and no program reads past it.
  The program whose slice holds the new token's slot also writes the new K/V rows into the cache (and uses
  them from registers), so the cache write costs no kernel of its own. With ``rope``, the query and new key
  arrive as raw projections and the program applies the layer's per-head RMSNorm (Qwen3) and RoPE to what it
  loads, in transformers' roundings (``attention.norm_rope`` is the reference), so those cost no kernel either.
  Scores, softmax and the output are accumulated in fp32 (online softmax); the probabilities are rounded to the
  value dtype before ``p @ V``, as the eager reference does.
* ``_reduce_kernel``, grid ``(B * H,)``, only when ``S > 1``: merges the partial (output, log-sum-exp) pairs.

Masking: slot ``n`` of row ``b`` is read when ``n < length`` and, with a bias, gets ``bias[b, n]`` added
(0 or -inf: the left padding of the prompts). Importable without Triton (``triton`` is then None and the
caller uses the eager op); kernels are defined at import, so ``TRITON_INTERPRET=1`` must be set before the
first import to run them on CPU tensors (tests do that).
"""

from __future__ import annotations

import torch as th

from rlvr_vocab.sampling import norm_fold, triton_env
from rlvr_vocab.sampling.triton_env import tl, triton  # None without Triton

# The launch configuration, chosen from ``bench.decode_parts`` on one H200 (BENCHMARKS.md): with the new token
# folded in after the loop (12-03 H), 64 slots x 4 warps x 3 stages and one split where the (row, KV head)
# programs already give every SM one was the fastest or within 1% of it at 32 x 512 (17.1 us), 256 x 1,024
# (156.2 us) and 32 x 4,096 (70.5 us); more splits only added time (the reduce kernel, shorter loops).
BLOCK_N = 64  # cache slots per block of the inner loop
WAVES = 1  # programs per SM aimed at when choosing the number of context splits
NUM_WARPS = 4  # warps per program of the split kernel
NUM_STAGES = 3  # software-pipeline stages of its loop over the cache blocks
MIN_DOT = 16  # tl.dot needs every dimension >= 16: query heads and head_dim are padded up to it
# the first cache block loaded before the query's work: slower on an H100 (12-06 H, BENCHMARKS.md): 23.8 against 22.3 us
# at 32 x 512, 1.70 against 1.67 ms per 32 x 512 decode step; kept off, and in the code to reproduce that (-peel)
PEEL = False


def interpreted() -> bool:
    """Were this module's kernels built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)?"""
    return triton is not None and triton_env.interpreted(_split_kernel)


if triton is not None:

    @triton.jit
    def _rms_normed(x, x_p, W, offs_d, partner, ok, D: tl.constexpr, eps, AXIS: tl.constexpr):
        """transformers' RMSNorm of rows ``x`` (over the last axis) and of their partner columns ``x_p``:
        ``w * (x * rsqrt(mean(x^2) + eps)).to(dtype)``, the product rounded to the dtype."""
        dtype = x.dtype
        xf = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(xf * xf, AXIS) / D + eps)
        if AXIS == 1:
            r = r[:, None]
        if AXIS == 1:
            w, w_p = (
                tl.load(W + offs_d[None, :], mask=ok, other=0.0),
                tl.load(W + partner[None, :], mask=ok, other=0.0),
            )
        else:
            w, w_p = tl.load(W + offs_d, mask=ok, other=0.0), tl.load(W + partner, mask=ok, other=0.0)
        normed = (w.to(tl.float32) * (xf * r).to(dtype).to(tl.float32)).to(dtype)
        normed_p = (w_p.to(tl.float32) * (x_p.to(tl.float32) * r).to(dtype).to(tl.float32)).to(dtype)
        return normed, normed_p

    @triton.jit
    def _rotated(x, x_p, cos, sin):
        """RoPE as transformers computes it, ``x * cos + rotate_half(x) * sin``, each product and the sum rounded
        to the dtype; ``x_p``: x at rotate_half's source columns, ``sin`` with rotate_half's sign folded in."""
        dtype = x.dtype
        a = (x.to(tl.float32) * cos.to(tl.float32)).to(dtype).to(tl.float32)
        c = (x_p.to(tl.float32) * sin.to(tl.float32)).to(dtype).to(tl.float32)
        return (a + c).to(dtype)

    @triton.jit
    def _attend(q, k, v, offs_n, n_ok, m, den, acc, Bias, b, stride_bb, scale,
                HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """One block of cached slots into the online softmax: (m, den, acc) updated."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK] fp32
        if HAS_BIAS:
            s += tl.load(Bias + b * stride_bb + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no NaN from -inf - -inf
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, den, acc

    @triton.jit(do_not_specialize=["SPLITS", "ss_blocks"])
    def _split_kernel(
        Q,
        KNew,
        VNew,
        K,
        V,
        Bias,
        Length,
        Start,
        Cos,
        Sin,
        NormW,
        SS,
        QKVBias,
        Out,
        PartO,
        PartL,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_knb,
        stride_knh,
        stride_knd,
        stride_vnb,
        stride_vnh,
        stride_vnd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_bb,
        stride_cb,
        stride_sinb,
        stride_ob,
        stride_oh,
        stride_pb,
        stride_ph,
        stride_ps,
        stride_ssb,
        ss_blocks,
        hidden,
        eps_in,
        scale,
        eps,
        SPLITS,
        HKV: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_START: tl.constexpr,
        ROPE: tl.constexpr,
        NORM: tl.constexpr,
        FOLD: tl.constexpr,
        BLOCK_S: tl.constexpr,
        HAS_QKV_BIAS: tl.constexpr,
        PRECISION: tl.constexpr,
        PDL: tl.constexpr,
        PEEL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // HKV
        kvh = pid % HKV
        length = tl.load(Length).to(tl.int32)
        slot = length - 1  # the new token's cache slot
        first = tl.load(Start + b).to(tl.int32) if HAS_START else 0  # the row's first slot not left padding
        first = tl.minimum(first, slot)
        per_split = tl.cdiv(tl.cdiv(length - first, SPLITS), BLOCK) * BLOCK
        start = first + split * per_split
        end = tl.minimum(start + per_split, length)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < G
        d_ok = offs_d < D
        heads = kvh * G + offs_g
        q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh
        q_ok = g_ok[:, None] & d_ok[None, :]
        k_row = K + b * stride_kb + kvh * stride_kh
        v_row = V + b * stride_vb + kvh * stride_vh
        loop_end = tl.minimum(end, slot)  # the cached slots this program reads (the new one comes after the loop)
        offs_p = start + tl.arange(0, BLOCK)
        p_ok = offs_p < loop_end
        if (
            PEEL
        ):  # the first block's K/V asked for before the query's loads, norm and RoPE, which then hide its latency
            kv_ok = p_ok[:, None] & d_ok[None, :]
            k_p0 = tl.load(k_row + offs_p[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
            v_p0 = tl.load(v_row + offs_p[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
        if PDL:  # launched before the kernel that wrote q / k / v finished: wait for it here (what came
            tl.extra.cuda.gdc_wait()  # before: the lengths, the tables; the cache and sums are older kernels')
        q = tl.load(q_ptrs + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
        k_ptrs = KNew + b * stride_knb + kvh * stride_knh
        k_new = tl.load(k_ptrs + offs_d * stride_knd, mask=d_ok, other=0.0)
        v_new = tl.load(VNew + b * stride_vnb + kvh * stride_vnh + offs_d * stride_vnd, mask=d_ok, other=0.0)
        r = 1.0
        q_bias = QKVBias + heads[:, None] * D  # norm_fold's biases: [Hq + 2 Hkv, D] rows, q then k then v
        k_bias = QKVBias + (HKV * G + kvh) * D
        if FOLD:  # the folded input RMSNorm: this row's scale from its sums of squares, on what is loaded
            offs_s = tl.arange(0, BLOCK_S)
            sums = tl.load(SS + b * stride_ssb + offs_s, mask=offs_s < ss_blocks, other=0.0)
            r = tl.rsqrt(tl.sum(sums, 0) / hidden + eps_in)
            q = norm_fold.scaled_tile(q, r, q_bias + offs_d[None, :], q_ok, HAS_QKV_BIAS)
            k_new = norm_fold.scaled_tile(k_new, r, k_bias + offs_d, d_ok, HAS_QKV_BIAS)
            v_new = norm_fold.scaled_tile(v_new, r, QKVBias + (HKV * (G + 1) + kvh) * D + offs_d, d_ok, HAS_QKV_BIAS)
        if ROPE:  # the layer's q/k RMSNorm (NORM) and RoPE on the raw projections, in transformers' roundings
            partner = tl.where(offs_d < D // 2, offs_d + D // 2, offs_d - D // 2)  # rotate_half's source column
            q_p = tl.load(q_ptrs + partner[None, :] * stride_qd, mask=q_ok, other=0.0)
            k_p = tl.load(k_ptrs + partner * stride_knd, mask=d_ok, other=0.0)
            if FOLD:
                q_p = norm_fold.scaled_tile(q_p, r, q_bias + partner[None, :], q_ok, HAS_QKV_BIAS)
                k_p = norm_fold.scaled_tile(k_p, r, k_bias + partner, d_ok, HAS_QKV_BIAS)
            cos = tl.load(Cos + b * stride_cb + offs_d, mask=d_ok, other=0.0)
            sin = tl.load(Sin + b * stride_sinb + offs_d, mask=d_ok, other=0.0)
            sin = tl.where(offs_d < D // 2, -sin, sin)  # rotate_half's sign: (-x2, x1)
            if NORM:
                w_q = NormW + heads[:, None] * D
                w_k = NormW + (HKV * G + kvh) * D
                q, q_p = _rms_normed(q, q_p, w_q, offs_d, partner, q_ok, D, eps, 1)
                k_new, k_p = _rms_normed(k_new, k_p, w_k, offs_d, partner, d_ok, D, eps, 0)
            q = _rotated(q, q_p, cos, sin)
            k_new = _rotated(k_new, k_p, cos, sin)
        if (slot >= start) & (slot < end):  # this program owns the new slot: write it (nobody else reads it)
            tl.store(k_row + slot * stride_kn + offs_d * stride_kd, k_new, mask=d_ok)
            tl.store(v_row + slot * stride_vn + offs_d * stride_vd, v_new, mask=d_ok)

        m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        den = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        # the loop reads only the cached slots (each loaded block feeds its dot directly, as Triton's pipeliner
        # wants) and the new token is folded in after it, from registers (12-03 H: 4-33% faster than swapping the
        # new rows into the loaded block)
        loop_start = start
        if PEEL:
            m, den, acc = _attend(q, k_p0, v_p0, offs_p, p_ok, m, den, acc, Bias, b, stride_bb, scale,
                                  HAS_BIAS, PRECISION)  # fmt: skip
            loop_start = start + BLOCK
        for n0 in range(loop_start, loop_end, BLOCK):
            offs_n = n0 + tl.arange(0, BLOCK)
            n_ok = offs_n < loop_end
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_row + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
            v = tl.load(v_row + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
            m, den, acc = _attend(q, k, v, offs_n, n_ok, m, den, acc, Bias, b, stride_bb, scale, HAS_BIAS, PRECISION)
        if PDL:  # the cache is read: the next kernel may launch (it waits for this one to finish)
            tl.extra.cuda.gdc_launch_dependents()
        # the new token, in the program that owns its slot (the others add exp(-inf) = 0)
        owns = (slot >= start) & (slot < end)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale  # [BLOCK_G]
        if HAS_BIAS:
            s_new += tl.load(Bias + b * stride_bb + slot).to(tl.float32)
        s_new = tl.where(owns & g_ok, s_new, float("-inf"))
        m_new = tl.maximum(m, s_new)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s_new - m_ref)
        den = den * alpha + p
        acc = acc * alpha[:, None] + p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
        m = m_new

        safe = tl.where(den > 0, den, 1.0)
        out = acc / safe[:, None]
        if SPLITS == 1:
            ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        else:
            lse = tl.where(den > 0, m + tl.log(safe), float("-inf"))
            base = b * stride_pb + heads * stride_ph + split * stride_ps
            tl.store(PartO + base[:, None] * BLOCK_D + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
            tl.store(PartL + base, lse, mask=g_ok)

    @triton.jit
    def _reduce_kernel(
        PartO,
        PartL,
        Out,
        stride_pb,
        stride_ph,
        stride_ps,
        stride_ob,
        stride_oh,
        H: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < SPLITS
        base = b * stride_pb + h * stride_ph + offs_s * stride_ps
        lse = tl.load(PartL + base, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.where(s_ok & (lse > float("-inf")), tl.exp(lse - top), 0.0)
        parts = tl.load(PartO + base[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
        tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)


def num_splits(rows: int, cache_len: int, device: th.device, sms: int | None = None) -> int:
    """Context splits per (row, KV head) program: about ``WAVES`` programs per SM, at most one split per block.

    ``rows``: batch x KV heads; ``sms``: the device's multiprocessors (None: read from ``device``; on the CPU,
    Triton's interpreter, which runs programs one by one, one).

    Example:
        >>> num_splits(64, 4096, th.device("cpu"), sms=132), num_splits(2048, 1024, th.device("cpu"), sms=132)
        (3, 1)
    """
    if sms is None:
        sms = th.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = -(-WAVES * sms // max(rows, 1))
    return max(1, min(wanted, -(-cache_len // BLOCK_N), 64))


def decode_attention(
    query: th.Tensor,
    key_new: th.Tensor,
    value_new: th.Tensor,
    key_cache: th.Tensor,
    value_cache: th.Tensor,
    length: th.Tensor,
    bias: th.Tensor | None,
    scaling: float,
    splits: int | None = None,
    block: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    start: th.Tensor | None = None,
    rope: tuple | None = None,
    fold: tuple | None = None,
    pdl: bool = False,
    peel: bool | None = None,
) -> th.Tensor:
    """Write the new K/V at slot ``length - 1`` and attend to slots ``[0, length)``: [B, 1, H, D].

    ``query``: [B, H, 1, D]; ``key_new``/``value_new``: [B, Hkv, 1, D]; ``key_cache``/``value_cache``:
    [B, Hkv, L, D] (last dim contiguous); ``length``: int64 [1] on the device; ``bias``: [B, L] additive (or
    None); ``splits``: context splits (None: ``num_splits``); ``block``, ``num_warps``, ``num_stages``: the
    split kernel's launch configuration (``bench.decode_parts`` measures the choices); ``start``: int [B], each
    row's first slot to read (its left padding is skipped: those slots must be masked by ``bias`` or unused);
    ``rope``: None (``query`` and ``key_new`` are final), or ``(cos, sin, norm_weight, eps)``: the raw projections
    get the layer's per-head RMSNorm (``norm_weight`` [H + Hkv, D], rows for the query heads then the KV heads, or
    None for none) and RoPE (``cos``/``sin`` [B, D], last dim contiguous) in the kernel, the new K written roped;
    ``fold``: None, or ``(ss, hidden, eps, qkv_bias)`` when the layer's input RMSNorm is folded into its projection
    (``norm_fold``): ``query``/``key_new``/``value_new`` are the folded GEMM's output, and the kernel first scales
    each row by ``rsqrt(sum(ss[b]) / hidden + eps)`` (``ss`` fp32 [B, S]: the input's sums of squares in S parts)
    and adds ``qkv_bias`` ([Hq + 2 Hkv, D] contiguous, q then k then v rows; or None); ``pdl``: launch the split
    kernel with programmatic dependent launch (Hopper and newer; the reduce kernel, with splits, is launched
    plainly): it waits for the kernel before it just
    before loading the query, and lets the next kernel launch once its loop over the cache is done; ``peel``: load
    the first cache block before the query's loads, norm and RoPE (None: ``PEEL``).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    b, h, _, d = query.shape
    hkv, cache_len = key_cache.shape[1], key_cache.shape[2]
    g = h // hkv
    splits = splits or num_splits(b * hkv, cache_len, query.device)
    block_d = max(MIN_DOT, triton.next_power_of_2(d))
    block_g = max(MIN_DOT, triton.next_power_of_2(g))
    out = query.new_empty(b, 1, h, d)
    if splits > 1:
        part_o = th.empty(b, h, splits, block_d, dtype=th.float32, device=query.device)
        part_l = th.empty(b, h, splits, dtype=th.float32, device=query.device)
    else:
        part_o = part_l = out  # unused
    precision = "ieee" if query.dtype == th.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    bias_arg = bias if bias is not None else length
    cos, sin, norm_weight, eps = rope if rope is not None else (length, length, None, 0.0)
    if rope is not None and not (cos.stride(-1) == 1 and sin.stride(-1) == 1 and d % 2 == 0):
        raise ValueError("decode_attention(rope=...): cos/sin need a contiguous last dim and head_dim an even size")
    if norm_weight is not None and not (norm_weight.is_contiguous() and norm_weight.shape == (h + hkv, d)):
        raise ValueError(f"decode_attention(rope=...): norm_weight must be a contiguous [{h + hkv}, {d}]")
    ss, hidden, eps_in, qkv_bias = fold if fold is not None else (None, 1, 0.0, None)
    if ss is not None and not (ss.dtype == th.float32 and ss.shape[0] == b and ss.stride(1) == 1):
        raise ValueError(f"decode_attention(fold=...): ss must be fp32 [{b}, S] with a contiguous last dim")
    if qkv_bias is not None and not (qkv_bias.is_contiguous() and qkv_bias.numel() == (h + 2 * hkv) * d):
        raise ValueError(f"decode_attention(fold=...): qkv_bias must be a contiguous [{h + 2 * hkv} x {d}]")
    _split_kernel[(b * hkv, splits)](
        query,
        key_new,
        value_new,
        key_cache,
        value_cache,
        bias_arg,
        length,
        start if start is not None else length,
        cos,
        sin,
        norm_weight if norm_weight is not None else length,
        ss if ss is not None else length,
        qkv_bias if qkv_bias is not None else length,
        out,
        part_o,
        part_l,
        query.stride(0),
        query.stride(1),
        query.stride(3),
        key_new.stride(0),
        key_new.stride(1),
        key_new.stride(3),
        value_new.stride(0),
        value_new.stride(1),
        value_new.stride(3),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        key_cache.stride(3),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        value_cache.stride(3),
        bias.stride(0) if bias is not None else 0,
        cos.stride(0) if rope is not None else 0,
        sin.stride(0) if rope is not None else 0,
        out.stride(0),
        out.stride(2),
        h * splits if splits > 1 else 0,
        splits if splits > 1 else 0,
        1,
        ss.stride(0) if ss is not None else 0,
        ss.shape[1] if ss is not None else 1,
        float(hidden),
        float(eps_in),
        scaling,
        float(eps),
        splits,
        HKV=hkv,
        G=g,
        D=d,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        BLOCK=block,
        HAS_BIAS=bias is not None,
        HAS_START=start is not None,
        ROPE=rope is not None,
        NORM=norm_weight is not None,
        FOLD=ss is not None,
        BLOCK_S=triton.next_power_of_2(ss.shape[1]) if ss is not None else 1,
        HAS_QKV_BIAS=qkv_bias is not None,
        PRECISION=precision,
        PDL=pdl,
        PEEL=PEEL if peel is None else peel,
        num_warps=num_warps,
        num_stages=num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    if splits > 1:
        _reduce_kernel[(b * h,)](
            part_o,
            part_l,
            out,
            h * splits,
            splits,
            1,
            out.stride(0),
            out.stride(2),
            H=h,
            D=d,
            BLOCK_D=block_d,
            SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits),
        )
    return out
