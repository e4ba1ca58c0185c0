"""Decode attention over the static cache: one custom op, two implementations (eager maths, Triton kernel).

The op ``rlvr_vocab::decode_attention`` writes the new token's K/V into the cache at slot ``length - 1`` and
attends one query token per row to slots ``[0, length)`` plus an additive per-row bias (the prompts' left
padding). It is a ``torch.library.custom_op``: opaque to ``torch.compile`` (a fake impl gives the output
shape), so the valid length, a device tensor, is read when the op runs or is captured, never traced.

* ``eager``: two batched matmuls (``baddbmm``, ``bmm``) per layer with the query heads of one KV head as the
  rows of one matmul, so K and V are read once (SDPA with a padding mask repeats K/V per query head, 3-5x
  the bytes). It reads the first W slots, W the width of the step's ``decode_mask`` (the length rounded up
  to a window, built once per step for all layers), so on CUDA one captured graph serves one window. Runs
  anywhere; the CPU path and the fallback.
* ``triton``: the flash-decoding kernel of ``triton_decode`` (split over the context, GQA fused, K/V write
  fused, early exit at the device-side length), so one captured graph serves every length. CUDA, or CPU
  tensors under ``TRITON_INTERPRET=1``.

``decode_attention`` is the function registered with transformers' ``AttentionInterface`` under
``DECODE_ATTENTION``; the sampler passes the cache and the length to it through the model's ``**kwargs``
(``rlvr_decode``), which transformers hands down to every attention call.
"""

from __future__ import annotations

import torch as th

from rlvr_vocab.sampling import norm_fold, triton_env

DECODE_ATTENTION = "rlvr_static_decode"  # name registered with transformers' AttentionInterface
IMPLEMENTATIONS = ("eager", "triton")


def triton_importable() -> bool:
    """Is Triton installed (the kernel may still fail to compile: the sampler checks it on first use)?"""
    from rlvr_vocab.sampling import triton_decode

    return triton_decode.triton is not None


def decode_mask(bias: th.Tensor, length: th.Tensor, window: int, kv_heads: int, dtype: th.dtype) -> th.Tensor:
    """The eager maths' additive mask of one step, shared by every layer: [B, Hkv, 1, W], W = ``window``.

    ``bias``: [B, L] fp32 (0, or -inf on the prompts' left padding); slots from ``length`` on are -inf too.
    """
    b = bias.shape[0]
    w = min(window, bias.shape[-1])
    slots = th.arange(w, device=bias.device)
    mask = th.where(slots < length, bias[:, :w], float("-inf")).to(dtype)
    return mask[:, None, None, :].expand(b, kv_heads, 1, w).contiguous()


def norm_rope(
    query: th.Tensor, key: th.Tensor, cos: th.Tensor, sin: th.Tensor, norm_weight: th.Tensor | None, eps: float
) -> tuple[th.Tensor, th.Tensor]:
    """The reference maths of the op's ``rope``: transformers' per-head RMSNorm (Qwen3; ``norm_weight``
    [H + Hkv, D], None for none) then RoPE, in the input dtype's roundings. ``query`` [B, H, 1, D], ``key``
    [B, Hkv, 1, D], ``cos``/``sin`` [B, 1, D]; returns the rotated (query, key)."""
    h = query.shape[1]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]: every head

    def rotate(x, weight):
        if weight is not None:
            dtype = x.dtype
            f = x.to(th.float32)
            x = weight[:, None, :] * (f * th.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        half = x.shape[-1] // 2
        return x * cos + th.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    if norm_weight is None:
        return rotate(query, None), rotate(key, None)
    return rotate(query, norm_weight[:h]), rotate(key, norm_weight[h:])


def unfold(
    query: th.Tensor,
    key: th.Tensor,
    value: th.Tensor,
    ss: th.Tensor,
    hidden: int,
    eps: float,
    qkv_bias: th.Tensor | None,
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """The reference maths of the op's ``fold``: the folded GEMM's q / k / v rows ([B, H or Hkv, 1, D]) scaled by
    their row's RMSNorm scale from ``ss`` fp32 [B, S], plus the qkv bias ([Hq + 2 Hkv] x D, or None)."""
    r = norm_fold.row_scale(ss, hidden, eps)[:, :, None, None]  # [B, 1, 1, 1]
    h, hkv, d = query.shape[1], key.shape[1], query.shape[-1]
    biases = (None,) * 3 if qkv_bias is None else qkv_bias.reshape(h + 2 * hkv, 1, d).split((h, hkv, hkv))
    return tuple(norm_fold.scaled(x, r, b) for x, b in zip((query, key, value), biases, strict=True))


def eager_decode_attention(
    query: th.Tensor,
    key_new: th.Tensor,
    value_new: th.Tensor,
    key_cache: th.Tensor,
    value_cache: th.Tensor,
    length: th.Tensor,
    mask: th.Tensor,
    scaling: float,
) -> th.Tensor:
    """The reference maths: write slot ``length - 1``, attend to the first W slots with ``mask`` added.

    Shapes as ``triton_decode.decode_attention``; ``mask``: ``decode_mask``'s [B, Hkv, 1, W]; returns
    [B, 1, H, D]. Scores are computed in the input dtype and the softmax in fp32, then rounded to the value
    dtype for ``p @ V`` (as transformers' eager attention).
    """
    slot = (length - 1).long()
    key_cache.index_copy_(2, slot, key_new)
    value_cache.index_copy_(2, slot, value_new)
    b, h, _, d = query.shape
    hkv = key_cache.shape[1]
    g = h // hkv
    w = mask.shape[-1]
    scores = th.baddbmm(  # mask + scaling * q @ k^T in one kernel: [B*Hkv, G, W]
        mask.reshape(b * hkv, 1, w),
        query.reshape(b * hkv, g, d),
        key_cache[:, :, :w].transpose(-1, -2).reshape(b * hkv, d, w),
        alpha=scaling,
    )
    probs = scores.softmax(-1, dtype=th.float32).to(value_cache.dtype)
    out = th.bmm(probs, value_cache[:, :, :w].reshape(b * hkv, w, d))  # [B*Hkv, G, D] == [B, 1, H, D]
    return out.reshape(b, 1, h, d)


@th.library.custom_op("rlvr_vocab::decode_attention", mutates_args=("key_cache", "value_cache"))
def _decode_attention_op(
    query: th.Tensor,
    key_new: th.Tensor,
    value_new: th.Tensor,
    key_cache: th.Tensor,
    value_cache: th.Tensor,
    length: th.Tensor,
    mask: th.Tensor,
    start: th.Tensor,
    scaling: float,
    impl: str,
    cos: th.Tensor | None = None,
    sin: th.Tensor | None = None,
    norm_weight: th.Tensor | None = None,
    eps: float = 0.0,
    ss: th.Tensor | None = None,
    qkv_bias: th.Tensor | None = None,
    hidden: int = 1,
    eps_in: float = 0.0,
    pdl: bool = False,
) -> th.Tensor:
    """The op behind ``decode_attention``. ``mask``: triton: the bias [B, 1, 1, L] fp32; eager: ``decode_mask``.

    ``start``: int32 [B], each row's first slot after its left padding (the Triton kernel skips the padding; the
    eager maths read it, masked). ``cos``/``sin`` [B, 1, D] (None: ``query``/``key_new`` are final): the raw
    projections get ``norm_rope`` first (the Triton kernel applies it to what it loads: no kernel of its own).
    ``ss`` (None: not folded): the input RMSNorm is folded into the projection (``norm_fold``), and ``unfold`` comes
    before everything else. ``pdl``: the Triton kernel with programmatic dependent launch."""
    fold = None if ss is None else (ss, hidden, eps_in, qkv_bias)
    if impl == "triton":
        from rlvr_vocab.sampling import triton_decode

        bias = mask.reshape(mask.shape[0], -1)
        rope = (
            None if cos is None else (cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1), norm_weight, eps)
        )
        return triton_decode.decode_attention(
            query,
            key_new,
            value_new,
            key_cache,
            value_cache,
            length,
            bias,
            scaling,
            start=start,
            rope=rope,
            fold=fold,
            pdl=pdl,
        )
    if fold is not None:
        query, key_new, value_new = unfold(query, key_new, value_new, *fold)
    if cos is not None:
        query, key_new = norm_rope(query, key_new, cos, sin, norm_weight, eps)
    return eager_decode_attention(query, key_new, value_new, key_cache, value_cache, length, mask, scaling)


@_decode_attention_op.register_fake
def _(query, key_new, value_new, key_cache, value_cache, length, mask, start, scaling, impl, *rope, **fold):
    b, h, _, d = query.shape
    return query.new_empty(b, 1, h, d)


def decode_attention(
    module: th.nn.Module,
    query: th.Tensor,
    key: th.Tensor,
    value: th.Tensor,
    attention_mask: th.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    rlvr_decode: dict | None = None,
    rope: tuple | None = None,
    fold: tuple | None = None,
    **kwargs,
) -> tuple[th.Tensor, None]:
    """transformers' attention-function signature, for the decode step: ([B, 1, H, D], None).

    ``query``: [B, H, 1, D]; ``key``/``value``: this token's [B, Hkv, 1, D] (the sampler passes no cache
    object, so the layer hands them over unchanged); ``attention_mask``: for ``triton`` the per-row additive
    bias [B, 1, 1, L] fp32, for ``eager`` the step's ``decode_mask``; ``rlvr_decode``: ``keys``/``values``
    (the cache buffers per layer, [B, Hkv, L, D]), ``length`` (int64 [1], device), ``start`` (int32 [B]: each
    row's first slot after its left padding), ``impl`` and ``pdl`` (the Triton kernel with programmatic dependent
    launch); ``rope``: None (``query`` and ``key`` are final: how
    transformers' layers call it), or ``(cos, sin, norm_weight, eps)`` from ``fused``'s layer: the raw projections,
    to which the op applies ``norm_rope``; ``fold``: None, or ``(ss, hidden, eps, qkv_bias)`` from ``fused``'s
    layer with its input RMSNorm folded into the projection (``unfold``). Query head ``h`` uses KV head ``h // (H / Hkv)``, as transformers'
    ``repeat_kv``.
    """
    if rlvr_decode is None:
        raise RuntimeError(f"attn_implementation={DECODE_ATTENTION!r} is only for FastSampler's decode step")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    layer = module.layer_idx
    out = _decode_attention_op(
        query,
        key,
        value,
        rlvr_decode["keys"][layer],
        rlvr_decode["values"][layer],
        rlvr_decode["length"],
        attention_mask,
        rlvr_decode["start"],
        scaling,
        rlvr_decode["impl"],
        *(rope or (None, None, None, 0.0)),
        **({} if fold is None else dict(zip(("ss", "hidden", "eps_in", "qkv_bias"), fold, strict=True))),
        pdl=bool(rlvr_decode.get("pdl")),
    )
    return out, None


def check_triton(dtype: th.dtype, heads: int, kv_heads: int, head_dim: int, device: th.device) -> str | None:
    """Run the Triton kernel once against the eager maths on random inputs: None if it agrees, else why not.

    Three context splits and one, a length that is not a multiple of the block, some left padding, the
    raw-projection form (``rope``: q/k RMSNorm and RoPE in the kernel) against ``norm_rope``, and with the input
    norm folded into the projection (``fold``) against ``unfold``; the tolerance is
    that of the dtype (fp32 1e-4, 16-bit 2e-2, relative to the largest output).
    """
    from rlvr_vocab.sampling import triton_decode

    gen = th.Generator(device=device).manual_seed(0)
    b, cache_len, length = 3, 320, 197

    def rand(*shape):
        return th.randn(*shape, generator=gen, device=device, dtype=th.float32).to(dtype)

    query = rand(b, 1, heads, head_dim).transpose(1, 2)
    key_new = rand(b, 1, kv_heads, head_dim).transpose(1, 2)
    value_new = rand(b, 1, kv_heads, head_dim).transpose(1, 2)
    keys, values = rand(b, kv_heads, cache_len, head_dim), rand(b, kv_heads, cache_len, head_dim)
    bias = th.zeros(b, cache_len, device=device)
    bias[1, :5] = float("-inf")
    bias[2, :60] = float("-inf")
    n = th.tensor([length], device=device)
    scaling = head_dim**-0.5
    mask = decode_mask(bias, n, cache_len, kv_heads, dtype)
    want = eager_decode_attention(query, key_new, value_new, keys.clone(), values.clone(), n, mask, scaling).float()
    angle = th.rand(b, 1, head_dim // 2, generator=gen, device=device) * 100
    cos, sin = (f(th.cat([angle, angle], -1)).to(dtype) for f in (th.cos, th.sin))
    weight = (1 + rand(heads + kv_heads, head_dim) * 0.3).contiguous()
    rq, rk = norm_rope(query, key_new, cos, sin, weight, 1e-6)
    rope_want = eager_decode_attention(rq, rk, value_new, keys.clone(), values.clone(), n, mask, scaling).float()
    fold = (th.rand(b, 3, generator=gen, device=device) * 40, 48, 1e-6, rand((heads + 2 * kv_heads) * head_dim))
    fq, fk, fv = unfold(query, key_new, value_new, *fold)
    fq, fk = norm_rope(fq, fk, cos, sin, weight, 1e-6)
    fold_want = eager_decode_attention(fq, fk, fv, keys.clone(), values.clone(), n, mask, scaling).float()
    tolerance = 1e-4 if dtype == th.float32 else 2e-2
    rope = (cos[:, 0], sin[:, 0], weight, 1e-6)
    cases = [
        (3, None, None, want, key_new),
        (1, None, None, want, key_new),
        (1, rope, None, rope_want, rk),
        (1, rope, fold, fold_want, fk),
    ]
    for splits, rope, folded, expected, new_key in cases:
        k, v = keys.clone(), values.clone()
        try:
            got = triton_decode.decode_attention(
                query, key_new, value_new, k, v, n, bias, scaling, splits, rope=rope, fold=folded
            ).float()
        except Exception as err:  # noqa: BLE001 - a compile or launch failure is the answer
            return triton_env.error_line(err)
        what = f"{splits} splits" + (", q/k norm and RoPE in the kernel" if rope else "")
        what += ", the input norm unfolded in the kernel" if folded else ""
        error = triton_env.relative_error(got, expected)
        if not error <= tolerance:  # also catches NaN
            return f"relative error {error:.2e} against the eager maths with {what}"
        new_value = fv if folded else value_new
        written = max(
            triton_env.relative_error(k[:, :, length - 1], new_key[:, :, 0]),
            triton_env.relative_error(v[:, :, length - 1], new_value[:, :, 0]),
        )
        if not written <= tolerance:
            return f"the new K/V were not written to the cache ({what})"
    return None


def register() -> None:
    """Make ``config._attn_implementation = DECODE_ATTENTION`` route transformers' attention calls here."""
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
