"""The prompt's forward through the fused layers: 15 kernel launches per decoder layer instead of transformers' ~54.

A 32-row prefill through transformers' eager layers launches ~1,500 kernels for a 28-layer model (each RMSNorm
seven, RoPE ten, ...), and waits on the host launching them: ~30 ms of a 32 x 512 call on an H100, 17 ms of it
kernel time (BENCHMARKS.md, 12-07 C); this one took 17.9 ms (420 launches) there (12-07 E), 8-14 ms less per
32-row call. With ``FastSampler(prefill="fused")`` (and ``"auto"`` on CUDA) each decoder layer's forward is
``layer_forward``, over the session's fused buffers (``fused.FusedWeights``, refreshed before the prefill):

* ``add_norm``: the residual add that the layer before left pending (its down projection's output) and the input
  RMSNorm, one kernel; in a folded session (``norm_fold``) the row's sum of squares instead of the normed copy;
* the q/k/v GEMM; ``qkv_rope``: the q/k RMSNorm (Qwen3) and RoPE in one kernel that also writes K and V into the
  static cache (folded: each row's norm scale and the qkv bias first, as the decode attention kernel does);
* transformers' attention function for the model (SDPA or eager) over the cache's first ``p`` slots, as its layer
  would call it;
* the o GEMM; ``add_norm`` again (the residual add and the post-attention norm); the gate/up GEMM; SiLU x up in
  one kernel (``silu_mul``; folded: ``norm_fold.silu_mul``); the down GEMM, whose output the next layer adds (the
  last layer adds it itself).

The roundings are transformers' (each norm, product and sum rounded to the dtype where its eager ops round), in
a folded session those of its decode step (``norm_fold``); sums are reduced in another order. ``impl="torch"``
runs the same maths in PyTorch ops (``*_reference``): the CPU path of the tests, and what ``check`` compares with.
"""

from __future__ import annotations

import sys

import torch as th
import torch.nn.functional as F

from rlvr_vocab.sampling import attention as attn
from rlvr_vocab.sampling import norm_fold, triton_env
from rlvr_vocab.sampling.triton_env import tl, triton  # None without Triton

IMPLEMENTATIONS = ("triton", "torch")
SILU_BLOCK = 1024  # activation columns per program of the SiLU x up kernel


def interpreted() -> bool:
    """Were this module's kernels built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)?"""
    return triton is not None and triton_env.interpreted(_add_norm_kernel)


if triton is not None:
    from rlvr_vocab.sampling.triton_decode import _rms_normed, _rotated

    @triton.jit
    def _add_norm_kernel(X, Delta, W, Res, Out, SS, hidden, eps, stride_x, stride_d, stride_r, stride_o,
                         BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, NORMED: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        ok = offs < hidden
        x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0)
        if HAS_DELTA:  # the residual add, rounded to the dtype as torch's add rounds it
            delta = tl.load(Delta + row * stride_d + offs, mask=ok, other=0.0)
            x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
            tl.store(Res + row * stride_r + offs, x, mask=ok)
        xf = x.to(tl.float32)
        ss = tl.sum(xf * xf, 0)
        tl.store(SS + row, ss)
        if NORMED:  # transformers' RMSNorm: w * (x * rsqrt(mean(x^2) + eps)).to(dtype), the product rounded
            r = tl.rsqrt(ss / hidden + eps)
            w = tl.load(W + offs, mask=ok, other=0.0)
            tl.store(Out + row * stride_o + offs, (w.to(tl.float32) * (xf * r).to(x.dtype).to(tl.float32)).to(x.dtype),
                     mask=ok)  # fmt: skip

    @triton.jit
    def _heads(row, first, heads, offs_d, partner, ok, r, QKVBias, NormW, cos, sin, eps,
               D: tl.constexpr, FOLD: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
               ROPE: tl.constexpr):  # fmt: skip
        """Heads ``first + heads`` of one token's qkv row: (folded: scaled, plus the bias), normed, rotated."""
        cols = (first + heads)[:, None] * D
        x = tl.load(row + cols + offs_d[None, :], mask=ok, other=0.0)
        if ROPE:
            x_p = tl.load(row + cols + partner[None, :], mask=ok, other=0.0)
        if FOLD:
            x = norm_fold.scaled_tile(x, r, QKVBias + cols + offs_d[None, :], ok, HAS_BIAS)
            if ROPE:
                x_p = norm_fold.scaled_tile(x_p, r, QKVBias + cols + partner[None, :], ok, HAS_BIAS)
        if NORM:
            x, x_p = _rms_normed(x, x_p, NormW + cols, offs_d, partner, ok, D, eps, 1)
        if ROPE:
            x = _rotated(x, x_p, cos[None, :], sin[None, :])
        return x

    # ``seq`` (the call's padded prompt length) is not specialised on: a multiple of 16 would compile it again
    @triton.jit(do_not_specialize=["seq"])
    def _qkv_kernel(QKV, SS, QKVBias, NormW, Cos, Sin, Q, K, V, seq, hidden, eps_in, eps,
                    stride_m, stride_cm, stride_sm, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn,
                    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, FOLD: tl.constexpr, HAS_BIAS: tl.constexpr,
                    NORM: tl.constexpr):  # fmt: skip
        m = tl.program_id(0)  # one token: row b, position s
        b = m // seq
        s = m % seq
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        partner = tl.where(offs_d < D // 2, offs_d + D // 2, offs_d - D // 2)  # rotate_half's source column
        cos = tl.load(Cos + m * stride_cm + offs_d, mask=d_ok, other=0.0)
        sin = tl.load(Sin + m * stride_sm + offs_d, mask=d_ok, other=0.0).to(tl.float32)  # exact; negated in fp32
        sin = tl.where(offs_d < D // 2, -sin, sin)  # rotate_half's sign: (-x2, x1)
        r = 1.0
        if FOLD:
            r = tl.rsqrt(tl.load(SS + m) / hidden + eps_in)
        row = QKV + m * stride_m
        hq = tl.arange(0, BLOCK_H)
        q_ok = (hq < H)[:, None] & d_ok[None, :]
        q = _heads(row, 0, hq, offs_d, partner, q_ok, r, QKVBias, NormW, cos, sin, eps, D, FOLD, HAS_BIAS, NORM, True)
        tl.store(Q + m * stride_qm + hq[:, None] * D + offs_d[None, :], q, mask=q_ok)
        hk = tl.arange(0, BLOCK_KV)
        kv_ok = (hk < HKV)[:, None] & d_ok[None, :]
        k = _heads(row, H, hk, offs_d, partner, kv_ok, r, QKVBias, NormW, cos, sin, eps, D, FOLD, HAS_BIAS, NORM, True)
        tl.store(K + b * stride_kb + hk[:, None] * stride_kh + s * stride_kn + offs_d[None, :], k, mask=kv_ok)
        v = _heads(row, H + HKV, hk, offs_d, partner, kv_ok, r, QKVBias, NormW, cos, sin, eps, D, FOLD, HAS_BIAS,
                   False, False)  # fmt: skip
        tl.store(V + b * stride_vb + hk[:, None] * stride_vh + s * stride_vn + offs_d[None, :], v, mask=kv_ok)

    @triton.jit
    def _silu_mul_kernel(GU, Out, inter, stride_g, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < inter
        gate = tl.load(GU + row * stride_g + offs, mask=ok, other=0.0)
        up = tl.load(GU + row * stride_g + inter + offs, mask=ok, other=0.0)
        tl.store(Out + row * stride_o + offs, norm_fold.silu_times(gate, up), mask=ok)


def _check_impl(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"prefill: impl={impl!r}: choose one of {IMPLEMENTATIONS}")
    if impl == "triton" and triton is None:
        raise RuntimeError("prefill: Triton is not installed")


# ----------------------------------------------------------------------------------- add + RMSNorm
def add_norm_reference(x: th.Tensor, delta: th.Tensor | None, weight: th.Tensor, eps: float, normed: bool = True):
    """``add_norm``'s maths in PyTorch ops (transformers' ``residual + h`` and RMSNorm)."""
    if delta is not None:
        x = x + delta
    ss = norm_fold.sums_of_squares(x)
    if not normed:
        return x, None, ss
    return x, weight * (x.float() * th.rsqrt(ss / x.shape[-1] + eps)).to(x.dtype), ss


def add_norm(
    x: th.Tensor,
    delta: th.Tensor | None,
    weight: th.Tensor,
    eps: float,
    normed: bool = True,
    impl: str = "triton",
) -> tuple[th.Tensor, th.Tensor | None, th.Tensor]:
    """(``x + delta``, its RMSNorm with ``weight`` (None unless ``normed``), its rows' sums of squares fp32 [M, 1]).

    ``x``, ``delta``: [M, hidden] (last dim contiguous; ``delta`` None: no add, ``x`` returned as it is).
    """
    _check_impl(impl)
    if impl == "torch":
        return add_norm_reference(x, delta, weight, eps, normed)
    m, hidden = x.shape
    if x.stride(-1) != 1 or (delta is not None and (delta.shape != x.shape or delta.stride(-1) != 1)):
        raise ValueError(f"prefill.add_norm: x and delta must be [{m}, {hidden}] with a contiguous last dim")
    res = x.new_empty(m, hidden) if delta is not None else x
    out = x.new_empty(m, hidden) if normed else x
    ss = th.empty(m, 1, dtype=th.float32, device=x.device)
    _add_norm_kernel[(m,)](
        x, delta if delta is not None else x, weight, res, out, ss, hidden, float(eps),
        x.stride(0), delta.stride(0) if delta is not None else 0, res.stride(0), out.stride(0),
        BLOCK=triton.next_power_of_2(hidden), HAS_DELTA=delta is not None, NORMED=normed,
        num_warps=4 if hidden <= 2048 else 8,
    )  # fmt: skip
    return res, out if normed else None, ss


# ----------------------------------------------------------------------------------- q/k norm, RoPE, cache
def qkv_rope_reference(qkv, heads, kv_heads, cos, sin, norm_weight, eps, keys, values, seq, fold=None):
    """``qkv_rope``'s maths in PyTorch ops (``attention.unfold`` and ``attention.norm_rope`` per token)."""
    m = qkv.shape[0]
    d = qkv.shape[1] // (heads + 2 * kv_heads)
    parts = qkv.view(m, heads + 2 * kv_heads, 1, d).split((heads, kv_heads, kv_heads), dim=1)
    query, key, value = parts
    if fold is not None:
        query, key, value = attn.unfold(query, key, value, *fold)
    query, key = attn.norm_rope(query, key, cos[:, None], sin[:, None], norm_weight, eps)
    b = m // seq
    keys[:, :, :seq] = key.view(b, seq, kv_heads, d).transpose(1, 2)
    values[:, :, :seq] = value.view(b, seq, kv_heads, d).transpose(1, 2)
    return query.reshape(b, seq, heads, d).transpose(1, 2)


def qkv_rope(
    qkv: th.Tensor,
    heads: int,
    kv_heads: int,
    cos: th.Tensor,
    sin: th.Tensor,
    norm_weight: th.Tensor | None,
    eps: float,
    keys: th.Tensor,
    values: th.Tensor,
    seq: int,
    fold: tuple | None = None,
    impl: str = "triton",
) -> th.Tensor:
    """The query [B, H, S, D] (a transposed view of [B, S, H, D]) from the q/k/v GEMM's output; K and V written.

    ``qkv``: [M = B * S, (H + 2 Hkv) D] (last dim contiguous), tokens row-major (row b's S tokens together);
    ``cos``/``sin``: [M, D] (last dim contiguous); ``norm_weight``: the q/k RMSNorm weights [H + Hkv, D] (Qwen3),
    or None; ``keys``/``values``: the layer's cache buffers [B, Hkv, L, D], slots ``[0, S)`` written (K normed and
    rotated); ``fold``: None, or ``(ss [M, 1] fp32, hidden, eps, qkv_bias or None)``: ``qkv`` is the folded GEMM's
    output (``norm_fold``), each row is scaled by its norm scale and gets the bias first.
    """
    _check_impl(impl)
    if impl == "torch":
        return qkv_rope_reference(qkv, heads, kv_heads, cos, sin, norm_weight, eps, keys, values, seq, fold)
    m, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    b = m // seq
    if qkv.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or keys.stride(-1) != 1 or d % 2:
        raise ValueError("prefill.qkv_rope: qkv, cos, sin and the cache need contiguous last dims, head_dim even")
    if norm_weight is not None and not (norm_weight.is_contiguous() and norm_weight.shape == (heads + kv_heads, d)):
        raise ValueError(f"prefill.qkv_rope: norm_weight must be a contiguous [{heads + kv_heads}, {d}]")
    ss, hidden, eps_in, bias = fold if fold is not None else (None, 1, 0.0, None)
    if bias is not None and not (bias.is_contiguous() and bias.numel() == width):
        raise ValueError(f"prefill.qkv_rope: the qkv bias must be a contiguous [{width}]")
    query = qkv.new_empty(b, seq, heads, d)
    _qkv_kernel[(m,)](
        qkv, ss if ss is not None else qkv, bias if bias is not None else qkv,
        norm_weight if norm_weight is not None else qkv, cos, sin, query, keys, values,
        seq, float(hidden), float(eps_in), float(eps),
        qkv.stride(0), cos.stride(0), sin.stride(0), heads * d,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        H=heads, HKV=kv_heads, D=d, BLOCK_H=triton.next_power_of_2(heads), BLOCK_KV=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(d), FOLD=ss is not None, HAS_BIAS=bias is not None,
        NORM=norm_weight is not None, num_warps=4,
    )  # fmt: skip
    return query.transpose(1, 2)


# ----------------------------------------------------------------------------------- SiLU x up
def silu_mul(gate_up: th.Tensor, impl: str = "triton") -> th.Tensor:
    """``silu(gate) * up`` [M, I] from the gate/up GEMM's output [M, 2I], in torch's roundings."""
    _check_impl(impl)
    if impl == "torch":
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    m, two_i = gate_up.shape
    if gate_up.stride(-1) != 1:
        raise ValueError("prefill.silu_mul: gate_up needs a contiguous last dim")
    out = gate_up.new_empty(m, two_i // 2)
    _silu_mul_kernel[(m, triton.cdiv(two_i // 2, SILU_BLOCK))](
        gate_up, out, two_i // 2, gate_up.stride(0), out.stride(0), BLOCK=SILU_BLOCK, num_warps=4
    )
    return out


# ----------------------------------------------------------------------------------- the layer
def _attention_function(module):
    """What transformers' attention module calls for the model's ``_attn_implementation``."""
    impl = module.config._attn_implementation
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def layer_forward(layer, hidden_states, attention_mask=None, position_embeddings=None, rlvr_prefill=None, **kwargs):
    """The prefill of one llama / qwen2 / qwen3 decoder layer over ``rlvr_prefill["fused"]``'s buffers.

    ``rlvr_prefill``: ``fused`` (``FusedWeights.inputs()``), ``fold`` (the buffers hold the norms folded in),
    ``fold_impl`` (``norm_fold.silu_mul``'s), ``impl`` (``triton`` or ``torch``), ``silu`` (every layer's MLP
    activation is SiLU: ``silu_mul``; else the activation module and a product), ``keys``/``values`` (the cache
    buffers per layer), ``rope`` (the cos / sin tables as [M, D], set by the first layer) and ``pending`` (the
    down projection's output of the layer before, which this layer adds: every layer but the last returns its
    residual stream without it).
    """
    p = rlvr_prefill
    a, mlp = layer.self_attn, layer.mlp
    qkv_w, qkv_b, gate_up_w, gate_up_b, qk_norm = p["fused"][a.layer_idx]
    fold, impl = p["fold"], p["impl"]
    b, s, hidden = hidden_states.shape
    d = a.head_dim
    hq, hkv = a.q_proj.out_features // d, a.k_proj.out_features // d

    norm = layer.input_layernorm
    pending = p.pop("pending", None)
    x, h, ss = add_norm(
        hidden_states.reshape(b * s, hidden), pending, norm.weight, norm.variance_epsilon, not fold, impl
    )
    qkv = F.linear(x if fold else h, qkv_w, None if fold else qkv_b)
    # [M, D], made once per prefill and shared by the layers (a copy only where transformers' tables are [1, S, D])
    cos, sin = p.setdefault("rope", tuple(t.expand(b, s, d).reshape(b * s, d) for t in position_embeddings))
    keys, values = p["keys"][a.layer_idx], p["values"][a.layer_idx]
    eps = a.q_norm.variance_epsilon if qk_norm is not None else 0.0
    folded = (ss, hidden, norm.variance_epsilon, qkv_b) if fold else None
    query = qkv_rope(qkv, hq, hkv, cos, sin, qk_norm, eps, keys, values, s, folded, impl)
    extra = {"sliding_window": a.sliding_window} if hasattr(a, "sliding_window") else {}
    kwargs.pop("past_key_values", None)  # what transformers' attention module keeps; the rest it hands on
    out, _ = _attention_function(a)(
        a, query, keys[:, :, :s], values[:, :, :s], attention_mask, dropout=0.0, scaling=a.scaling, **extra, **kwargs
    )
    o = a.o_proj(out.reshape(b * s, -1))

    norm = layer.post_attention_layernorm
    x, h, ss = add_norm(x, o, norm.weight, norm.variance_epsilon, not fold, impl)
    gate_up = F.linear(x if fold else h, gate_up_w, None if fold else gate_up_b)
    if fold:
        act = norm_fold.silu_mul(gate_up, ss, hidden, norm.variance_epsilon, gate_up_b, p["fold_impl"])
    elif p["silu"]:
        act = silu_mul(gate_up, impl)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        act = mlp.act_fn(gate) * up
    down = mlp.down_proj(act)
    if a.layer_idx == len(p["fused"]) - 1:
        return (x + down).view(b, s, hidden)
    p["pending"] = down
    return x.view(b, s, hidden)


def check(dtype: th.dtype, device: th.device) -> str | None:
    """Run the three kernels against their PyTorch maths on random inputs: None if they agree, else why not.

    ``add_norm`` with and without the add and the normed copy; ``qkv_rope`` plain and folded with a bias, with the
    q/k norm, 3 rows x 5 tokens, head_dim 32; ``silu_mul`` with an intermediate size off the block. The tolerance is
    the dtype's (fp32 1e-4, 16-bit 2e-2, relative to the largest output).
    """
    if triton is None:
        return "Triton is not installed"
    gen = th.Generator(device=device).manual_seed(0)
    tolerance = 1e-4 if dtype == th.float32 else 2e-2

    def rand(*shape, scale=1.0):
        return (th.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    def compare(what, got, want) -> str | None:
        for g, w in zip(got, want, strict=True):
            if g is None and w is None:
                continue
            error = triton_env.relative_error(g, w)
            if not error <= tolerance:  # also catches NaN
                return f"{what}: relative error {error:.2e} against the PyTorch maths"
        return None

    b, seq, heads, kv_heads, d, hidden = 3, 5, 4, 2, 32, 96
    m = b * seq
    x, delta, weight = rand(m, hidden, scale=3), rand(m, hidden), 1 + rand(hidden, scale=0.3)
    qkv, bias = rand(m, (heads + 2 * kv_heads) * d, scale=2), rand((heads + 2 * kv_heads) * d, scale=0.3)
    angle = th.rand(m, d // 2, generator=gen, device=device) * 100
    cos, sin = (f(th.cat([angle, angle], -1)).to(dtype) for f in (th.cos, th.sin))
    norm_weight = (1 + rand(heads + kv_heads, d, scale=0.3)).contiguous()
    fold = (norm_fold.sums_of_squares(x), hidden, 1e-6, bias)
    gate_up = rand(m, 2 * (SILU_BLOCK + 40), scale=3)
    try:
        for with_delta, normed in ((False, True), (True, True), (True, False)):
            args = (x, delta if with_delta else None, weight, 1e-6, normed)
            what = f"add_norm (add {with_delta}, normed {normed})"
            if (error := compare(what, add_norm(*args), add_norm_reference(*args))) is not None:
                return error
        for folded in (None, fold):
            caches = [th.zeros(b, kv_heads, seq + 3, d, dtype=dtype, device=device) for _ in range(4)]
            got = qkv_rope(qkv, heads, kv_heads, cos, sin, norm_weight, 1e-6, *caches[:2], seq, folded)
            want = qkv_rope_reference(qkv, heads, kv_heads, cos, sin, norm_weight, 1e-6, *caches[2:], seq, folded)
            what = "qkv_rope" + (" folded" if folded else "")
            if (error := compare(what, (got, *caches[:2]), (want, *caches[2:]))) is not None:
                return error
        if (error := compare("silu_mul", (silu_mul(gate_up),), (silu_mul(gate_up, "torch"),))) is not None:
            return error
    except Exception as err:  # noqa: BLE001 - a compile or launch failure is the answer
        return triton_env.error_line(err)
    return None
