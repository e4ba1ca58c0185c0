"""The decode step's decoder layer with fused projections: one GEMM for Q, K and V, one for gate and up.

At a few dozen rows a decode step is bound by its kernels' fixed cost, not by bytes: each of a layer's seven
projections is its own ~4-5 µs GEMM. Concatenating the weights of the projections that read the same input
gives four GEMMs per layer instead of seven (qkv, o, gate_up, down) (BENCHMARKS.md: 34.2 against 24.1 µs of
GEMMs per layer at 32 rows). The query and key go to the decode attention op raw, with the layer's RoPE tables
and Qwen3's q/k RMSNorm weights: the Triton kernel norms and rotates what it loads, so those cost no kernel of
their own (they took ~4.4 µs per layer as one compiled kernel, 12-03 F). At up to ``triton_linear.MAX_ROWS``
rows the projections named in ``rlvr_decode["linear"]`` (``o``, ``down``; ``qkv``, ``gate_up``) are
``triton_linear``'s kernels, split over K in one kernel, with the residual add inside (``gated``: the gate/up GEMM
and SiLU x up in one kernel, ``triton_linear.gated``); with ``fold`` the two
RMSNorms are folded into the qkv and gate_up weights (``norm_fold``, ``_folded_forward``).

* ``FusedWeights.build(model)``: buffers [Hq·D + 2·Hkv·D, hidden] and [2·intermediate, hidden] per layer (plus
  the biases, and Qwen3's per-head norm weights [Hq + Hkv, D]), or a reason why not (a layer that is not a
  plain ``nn.Linear``: PEFT, quantised, DTensor). They double those weights' memory while a sampler session
  holds them, and are rebuilt with it.
* ``refresh()``: copies the model's current weights in (every ``generate`` call: training changes them; ~2/3
  of the non-embedding weights: 0.59 GB for Qwen3-0.6B, ~0.3 ms by the H200's copy bandwidth).
* ``installed(fused)``: while it is open each decoder layer's ``forward`` is ``layer_forward``, which
  takes its buffers from ``rlvr_decode["fused"]`` (graph inputs, so new buffers need no recompilation) and
  computes what transformers' llama / qwen2 / qwen3 layer computes, in the same order and dtypes.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch as th
import torch.nn.functional as F

from rlvr_vocab.sampling import attention as attn
from rlvr_vocab.sampling import norm_fold, prefill
from rlvr_vocab.sampling import triton_linear as tlin

LAYER_CLASSES = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def _plain(linear) -> bool:
    return type(linear) is th.nn.Linear and type(linear.weight.data) is th.Tensor and linear.weight.numel() > 0


def silu_mlp(layer) -> bool:
    """Is the layer's MLP activation SiLU (what ``norm_fold`` and ``triton_linear.gated`` compute)?"""
    return isinstance(layer.mlp.act_fn, th.nn.SiLU) or type(layer.mlp.act_fn).__name__ == "SiLUActivation"


def _cat_into(out: th.Tensor | None, parts: list[th.Tensor | None]) -> None:
    if out is not None:
        th.cat([p.detach() for p in parts], dim=0, out=out)


@dataclass
class LayerWeights:
    """One layer's fused buffers and the modules they are copied from."""

    qkv: th.Tensor  # [Hq*D + 2*Hkv*D, hidden]
    qkv_bias: th.Tensor | None
    gate_up: th.Tensor  # [2*intermediate, hidden]
    gate_up_bias: th.Tensor | None
    qk_norm: th.Tensor | None  # [Hq + Hkv, D] (Qwen3), else None
    layer: th.nn.Module
    fold: bool = False  # qkv and gate_up hold W * the RMSNorm weight before them (norm_fold)

    def refresh(self) -> None:
        a, m = self.layer.self_attn, self.layer.mlp
        _cat_into(self.qkv, [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        _cat_into(self.qkv_bias, [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        _cat_into(self.gate_up, [m.gate_proj.weight, m.up_proj.weight])
        _cat_into(self.gate_up_bias, [m.gate_proj.bias, m.up_proj.bias])
        if self.fold:
            norm_fold.fold_weight(self.qkv, self.layer.input_layernorm.weight)
            norm_fold.fold_weight(self.gate_up, self.layer.post_attention_layernorm.weight)
        if self.qk_norm is not None:
            hq, d = a.q_proj.out_features // a.head_dim, a.head_dim
            self.qk_norm[:hq].copy_(a.q_norm.weight.detach().expand(hq, d))
            self.qk_norm[hq:].copy_(a.k_norm.weight.detach().expand(self.qk_norm.shape[0] - hq, d))


def _layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    return getattr(inner, "layers", None)


def unfusable(model) -> str | None:
    """Why the decode layers cannot be fused (None: they can)."""
    layers = _layers(model)
    if layers is None or len(layers) == 0:
        return "no model.model.layers"
    for layer in layers:
        name = type(layer).__name__
        if name not in LAYER_CLASSES:
            return f"decoder layer {name} is not one of {LAYER_CLASSES}"
        a, m = layer.self_attn, layer.mlp
        linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        if not all(_plain(x) for x in linears):
            return "a projection is not a plain nn.Linear (PEFT, quantised or sharded weights)"
        if (a.q_proj.bias is None) != (a.k_proj.bias is None) or (a.k_proj.bias is None) != (a.v_proj.bias is None):
            return "q/k/v projections differ in having a bias"
        if (m.gate_proj.bias is None) != (m.up_proj.bias is None):
            return "gate/up projections differ in having a bias"
        if hasattr(a, "q_norm") and a.q_norm.variance_epsilon != a.k_norm.variance_epsilon:
            return "q_norm and k_norm have different eps"
    return None


class FusedWeights:
    """The fused buffers of every decoder layer of one model (see the module docstring)."""

    def __init__(self, layers: list[LayerWeights]):
        self.layers = layers
        self.fold = bool(layers) and layers[0].fold
        # one bound forward per layer, made once: the same object at every install keeps dynamo's guards
        self.forwards = [types.MethodType(layer_forward, lw.layer) for lw in layers]
        self.prefill_forwards = [types.MethodType(prefill.layer_forward, lw.layer) for lw in layers]
        self.silu = all(silu_mlp(lw.layer) for lw in layers)

    @classmethod
    def build(cls, model, fold: bool = False) -> tuple[FusedWeights | None, str | None]:
        """(fused weights with the model's current values, None), or (None, why the layers cannot be fused).

        ``fold``: the qkv and gate_up buffers hold the weights times the RMSNorm weight before them (``norm_fold``),
        where every layer's MLP activation is SiLU (``silu_mlp``: the folded SiLU x up assumes it; else not folded).
        """
        reason = unfusable(model)
        if reason is not None:
            return None, reason
        fold = fold and all(silu_mlp(layer) for layer in _layers(model))
        out = []
        for layer in _layers(model):
            a, m = layer.self_attn, layer.mlp

            def empty(*linears, bias=False):
                if bias and linears[0].bias is None:
                    return None
                w = linears[0].bias if bias else linears[0].weight
                rows = sum(x.out_features for x in linears)
                return w.new_empty((rows,) if bias else (rows, linears[0].in_features))

            qk_norm = None
            if hasattr(a, "q_norm"):
                heads = (a.q_proj.out_features + a.k_proj.out_features) // a.head_dim
                qk_norm = a.q_norm.weight.new_empty(heads, a.head_dim)
            lw = LayerWeights(
                qkv=empty(a.q_proj, a.k_proj, a.v_proj),
                qkv_bias=empty(a.q_proj, a.k_proj, a.v_proj, bias=True),
                gate_up=empty(m.gate_proj, m.up_proj),
                gate_up_bias=empty(m.gate_proj, m.up_proj, bias=True),
                qk_norm=qk_norm,
                layer=layer,
                fold=fold,
            )
            lw.refresh()
            out.append(lw)
        return cls(out), None

    @th.no_grad()
    def refresh(self) -> None:
        for lw in self.layers:
            lw.refresh()

    def max_columns(self) -> int:
        """The most output columns of a projection ``triton_linear`` may run (its split-K workspace)."""
        outs = [p.out_features for lw in self.layers for p in (lw.layer.self_attn.o_proj, lw.layer.mlp.down_proj)]
        return max(outs + [t.shape[0] for lw in self.layers for t in (lw.qkv, lw.gate_up)])

    def small_unfit(self, names: tuple[str, ...] = ("o", "down")) -> str | None:
        """Why ``triton_linear``'s kernels cannot serve these layers' projections ``names`` (None: they can)."""
        for lw in self.layers:
            a, m = lw.layer.self_attn, lw.layer.mlp
            if not (a.o_proj.weight.is_contiguous() and m.down_proj.weight.is_contiguous()):
                return "the o / down projection weights are not contiguous"
            if "gated" in names and not silu_mlp(lw.layer):
                return f"the MLP activation is {type(m.act_fn).__name__}, not SiLU (gated computes SiLU x up)"
        return None

    def nbytes(self) -> int:
        tensors = [t for lw in self.layers for t in (lw.qkv, lw.qkv_bias, lw.gate_up, lw.gate_up_bias, lw.qk_norm)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def inputs(self) -> list[tuple]:
        """Per layer (qkv, qkv bias, gate_up, gate_up bias, qk norm): what ``rlvr_decode["fused"]`` carries."""
        return [(lw.qkv, lw.qkv_bias, lw.gate_up, lw.gate_up_bias, lw.qk_norm) for lw in self.layers]


def layer_forward(layer, hidden_states, attention_mask=None, position_embeddings=None, rlvr_decode=None, **kwargs):
    """The decode step of one llama / qwen2 / qwen3 decoder layer with ``rlvr_decode["fused"]``'s buffers.

    At most ``triton_linear.MAX_ROWS`` rows: the projections named in ``rlvr_decode["linear"]`` (``o``, ``down``)
    are ``triton_linear``'s kernels with the residual add inside. ``rlvr_decode["fold"]``: the buffers hold the
    RMSNorms folded in (``FusedWeights(fold=True)``): ``_folded_forward``.
    """
    b, s, hidden = hidden_states.shape
    small = (rlvr_decode.get("linear") or ()) if b * s <= tlin.MAX_ROWS else ()
    if rlvr_decode.get("fold"):
        return _folded_forward(layer, hidden_states, attention_mask, position_embeddings, rlvr_decode, small, **kwargs)
    a, m = layer.self_attn, layer.mlp
    qkv_w, qkv_b, gate_up_w, gate_up_b, qk_norm = rlvr_decode["fused"][a.layer_idx]
    d = a.head_dim
    hq, hkv = a.q_proj.out_features // d, a.k_proj.out_features // d
    work, pdl = rlvr_decode.get("linear_work"), bool(rlvr_decode.get("pdl"))

    residual = hidden_states
    h = layer.input_layernorm(hidden_states)
    qkv = _gemm(h, qkv_w, qkv_b, "qkv" in small, work, pdl)  # [B, S, (Hq + 2 Hkv) D]
    query, key, value = _split_qkv(qkv, hq, hkv, d)  # raw: the op norms and rotates
    cos, sin = _rope_tables(position_embeddings, rlvr_decode)
    eps = a.q_norm.variance_epsilon if qk_norm is not None else 0.0
    out, _ = attn.decode_attention(
        a, query, key, value, attention_mask, scaling=a.scaling, rlvr_decode=rlvr_decode,
        rope=(cos, sin, qk_norm, eps), **kwargs,
    )  # fmt: skip
    if "o" in small:
        o = a.o_proj
        x = tlin.small_linear(out.reshape(b * s, -1), o.weight, o.bias, residual.reshape(b * s, hidden), work, pdl=pdl)
        h = x.view(b, s, hidden)
    else:
        h = residual + a.o_proj(out.reshape(b, s, -1).contiguous())

    residual = h
    h = layer.post_attention_layernorm(h)
    if "gated" in small:  # the gate/up GEMM and SiLU x up in one kernel
        act = tlin.small_gated(h.reshape(b * s, hidden), gate_up_w, gate_up_b).view(b, s, -1)
    else:
        gate, up = _gemm(h, gate_up_w, gate_up_b, "gate_up" in small, work, pdl).chunk(2, dim=-1)
        act = m.act_fn(gate) * up
    if "down" in small:
        down = m.down_proj
        res = residual.reshape(b * s, hidden)
        out = tlin.small_linear(act.reshape(b * s, -1), down.weight, down.bias, res, work, pdl=pdl)
        return out.view(b, s, hidden)
    return residual + m.down_proj(act)


def _gemm(x: th.Tensor, weight: th.Tensor, bias: th.Tensor | None, small: bool, work, pdl: bool) -> th.Tensor:
    """``F.linear(x, weight, bias)`` (x [..., K]): ``triton_linear``'s kernel where ``small``, else cuBLAS's."""
    if not small:
        return F.linear(x, weight, bias)
    out = tlin.small_linear(x.reshape(-1, x.shape[-1]), weight, bias, None, work, pdl=pdl)
    return out.view(*x.shape[:-1], weight.shape[0])


def _rope_tables(position_embeddings, rlvr_decode: dict) -> tuple[th.Tensor, th.Tensor]:
    """The step's (cos, sin) [B, 1, D], made contiguous by the first layer and shared by the others: handed to
    every layer's attention op as they are, Inductor wrote a copy per layer (7 kernels per 28-layer step)."""
    return rlvr_decode.setdefault("rope_tables", tuple(t.contiguous() for t in position_embeddings))


def _split_qkv(qkv: th.Tensor, hq: int, hkv: int, d: int) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """[B, S, (Hq + 2 Hkv) D] -> query [B, Hq, S, D], key and value [B, Hkv, S, D] (views)."""
    b, s, _ = qkv.shape
    qk = qkv[..., : (hq + hkv) * d].view(b, s, hq + hkv, d)
    value = qkv[..., (hq + hkv) * d :].view(b, s, hkv, d).transpose(1, 2)
    return qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2), value


def _projected(x: th.Tensor, proj, residual: th.Tensor, small: bool, work, pdl: bool) -> tuple[th.Tensor, th.Tensor]:
    """``residual + proj(x)`` [M, N] and its rows' sums of squares fp32 [M, S] (the next folded norm's input):
    ``triton_linear``'s kernel with the sums in its epilogue (``small``), else PyTorch ops."""
    if small:
        return tlin.small_linear(x, proj.weight, proj.bias, residual, work, sums=True, pdl=pdl)
    out = residual + proj(x)
    return out, norm_fold.sums_of_squares(out)


def _folded_forward(layer, hidden_states, attention_mask, position_embeddings, rlvr_decode, small, **kwargs):
    """``layer_forward`` with both RMSNorms folded into the projections after them (``norm_fold``): the qkv and
    gate_up buffers hold ``W * w``; the attention op and ``norm_fold.silu_mul`` apply each row's scale, from the
    sums of squares that the layer before left in ``rlvr_decode["ss"]`` (the first layer sums its input here)."""
    a, m = layer.self_attn, layer.mlp
    qkv_w, qkv_b, gate_up_w, gate_up_b, qk_norm = rlvr_decode["fused"][a.layer_idx]
    d = a.head_dim
    hq, hkv = a.q_proj.out_features // d, a.k_proj.out_features // d
    b, s, hidden = hidden_states.shape
    work, pdl = rlvr_decode.get("linear_work"), bool(rlvr_decode.get("pdl"))
    x = hidden_states.reshape(b * s, hidden)
    ss = rlvr_decode.get("ss")
    if a.layer_idx == 0 or ss is None:
        ss = norm_fold.sums_of_squares(x)
    # [B, S, (Hq + 2 Hkv) D]; the bias is added after the scale, in the op
    qkv = _gemm(hidden_states, qkv_w, None, "qkv" in small, work, pdl)
    query, key, value = _split_qkv(qkv, hq, hkv, d)
    cos, sin = _rope_tables(position_embeddings, rlvr_decode)
    eps = a.q_norm.variance_epsilon if qk_norm is not None else 0.0
    norm = layer.input_layernorm
    out, _ = attn.decode_attention(
        a, query, key, value, attention_mask, scaling=a.scaling, rlvr_decode=rlvr_decode,
        rope=(cos, sin, qk_norm, eps), fold=(ss, hidden, norm.variance_epsilon, qkv_b), **kwargs,
    )  # fmt: skip
    h, ss = _projected(out.reshape(b * s, -1), a.o_proj, x, "o" in small, work, pdl)
    norm = layer.post_attention_layernorm
    if "gated" in small:  # the gate/up GEMM, the row scale and SiLU x up in one kernel
        act = tlin.small_gated(h, gate_up_w, gate_up_b, ss, hidden, norm.variance_epsilon)
    else:
        gate_up = _gemm(h, gate_up_w, None, "gate_up" in small, work, pdl)  # [M, 2 I]; the bias comes after the scale
        impl = rlvr_decode.get("fold_impl", "torch")
        act = norm_fold.silu_mul(gate_up, ss, hidden, norm.variance_epsilon, gate_up_b, impl, pdl)
    out, rlvr_decode["ss"] = _projected(act, m.down_proj, h, "down" in small, work, pdl)
    return out.view(b, s, hidden)


@contextlib.contextmanager
def installed(fused: FusedWeights | None, for_prefill: bool = False):
    """Each decoder layer's ``forward`` is ``layer_forward`` inside the block, or with ``for_prefill``
    ``prefill.layer_forward`` (nothing changes for None)."""
    if fused is None:
        yield
        return
    forwards = fused.prefill_forwards if for_prefill else fused.forwards
    for lw, forward in zip(fused.layers, forwards, strict=True):
        lw.layer.forward = forward
    try:
        yield
    finally:
        for lw in fused.layers:
            lw.layer.__dict__.pop("forward", None)
