"""fp32 master weights (rlvr_vocab/optim.py): bf16 weights move as an fp32 reference does only with the copies, the
copies survive a checkpoint bit for bit, a scheduler reaches them, and a real TRL run on a bf16 model steps them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch as th
from conftest import digit_share

from rlvr_vocab.optim import MASTERS_KEY, FP32MasterWeights
from rlvr_vocab.rewards.registry import REWARD_REGISTRY
from rlvr_vocab.train import train


def _problem(steps: int = 20, seed: int = 0) -> tuple[th.Tensor, list[th.Tensor]]:
    g = th.Generator().manual_seed(seed)
    w0 = th.randn(64, 64, generator=g) * 0.1  # the scale of SmolLM2's de-quantised weights (median |w| 0.108)
    direction = th.randn(64, 64, generator=g)  # gradients that agree from step to step, plus noise
    return w0, [direction + 0.3 * th.randn(64, 64, generator=g) for _ in range(steps)]


def _adamw(w: th.nn.Parameter, wrap: bool, lr: float = 1e-4):
    opt = th.optim.AdamW([w], lr=lr, weight_decay=0.0)
    return FP32MasterWeights(opt) if wrap else opt


def _steps(w, opt, grads) -> None:
    for grad in grads:
        w.grad = grad.to(w.dtype)
        opt.step()
        opt.zero_grad()


def test_bf16_weights_follow_the_fp32_reference_only_with_master_weights():
    w0, grads = _problem()
    runs = {}
    for name, dtype, wrap in (
        ("fp32", th.float32, False),
        ("bf16", th.bfloat16, False),
        ("master", th.bfloat16, True),
    ):
        w = th.nn.Parameter(w0.clone().to(dtype))  # clone: w0 itself must not move
        _steps(w, _adamw(w, wrap), grads)
        runs[name] = w.detach().float() - w0.to(dtype).float()  # how far each weight moved in 20 steps of lr 1e-4
    reference = runs["fp32"]

    def error(moved):  # of the movement, relative to the fp32 reference's
        return float((moved - reference).norm() / reference.norm())

    assert error(runs["master"]) < 0.15  # what is left is the rounding of the final weight to bf16
    assert error(runs["bf16"]) > 0.5  # most 1e-4 updates of weights near 0.1 round away
    assert (runs["bf16"] == 0).float().mean() > 0.3  # many weights never moved at all
    assert (runs["master"] == 0).float().mean() < 0.1


def test_the_masters_survive_a_checkpoint_bit_for_bit():
    w0, grads = _problem(steps=10, seed=1)
    straight = th.nn.Parameter(w0.to(th.bfloat16))  # a copy (bf16): w0 stays as it is
    _steps(straight, _adamw(straight, wrap=True), grads)

    first = th.nn.Parameter(w0.to(th.bfloat16))
    opt = _adamw(first, wrap=True)
    _steps(first, opt, grads[:5])
    buffer = io.BytesIO()
    th.save({"weight": first.detach(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = th.load(buffer)
    assert saved["optimizer"][MASTERS_KEY][0].dtype == th.float32

    resumed = th.nn.Parameter(saved["weight"].clone())
    opt = _adamw(resumed, wrap=True)
    opt.load_state_dict(saved["optimizer"])
    assert opt.optimizer.state[opt.masters[0]]["exp_avg"].dtype == th.float32  # not cast to the bf16 weight's
    _steps(resumed, opt, grads[5:])
    assert th.equal(resumed, straight)  # starting the copies from the bf16 weights would not give this

    stale = th.nn.Parameter(saved["weight"].clone())
    opt = _adamw(stale, wrap=True)
    without = {
        k: v for k, v in saved["optimizer"].items() if k != MASTERS_KEY
    }  # as from training.master_weights=false
    opt.load_state_dict(without)
    _steps(stale, opt, grads[5:])
    assert not th.equal(stale, straight)


def test_a_scheduler_sets_the_learning_rate_of_the_wrapped_optimizer():
    w = th.nn.Parameter(th.full((8,), 0.1, dtype=th.bfloat16))
    opt = _adamw(w, wrap=True, lr=1e-2)
    assert opt.param_groups is opt.optimizer.param_groups
    scheduler = th.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    before = w.detach().clone()
    _steps(w, opt, [th.ones(8)])
    scheduler.step()
    assert th.equal(w, before)  # lr 0 reached the inner optimizer
    with pytest.raises(TypeError, match="already wrapped"):
        FP32MasterWeights(opt)


@pytest.fixture
def _digit_reward(monkeypatch):
    monkeypatch.setitem(REWARD_REGISTRY, "digit_share", digit_share)


@pytest.mark.usefixtures("_digit_reward")
def test_grpo_on_a_bf16_model_steps_fp32_masters_and_resumes_with_them(make_cfg):
    """A tiny model loaded in bf16 (as dtype: auto does on a GPU): the run's optimizer keeps fp32 copies, its
    checkpoints hold them, a resumed run loads them; training.master_weights=false steps the bf16 weights."""
    run = [
        "experiment=debug",
        "reward.funcs=[digit_share]",
        "reward.weights=[1.0]",
        "training.max_completion_length=12",
        "training.learning_rate=1e-4",
        "model.model_kwargs.dtype=bfloat16",
    ]
    cfg = make_cfg(*run, "training.max_steps=2", "training.save_steps=1")
    assert train(cfg)["global_step"] == 2
    out = Path(cfg.output_dir)
    state = th.load(out / "checkpoint-2" / "optimizer.pt", weights_only=False)
    masters = state[MASTERS_KEY]
    assert masters and all(m.dtype == th.float32 for m in masters)
    assert all(s["exp_avg"].dtype == th.float32 for s in state["state"].values())
    assert "fp32 master weights for" in (out / "train.log").read_text()

    cfg = make_cfg(*run, "training.max_steps=3", "training.save_steps=1")  # resume into the same run dir
    assert train(cfg)["global_step"] == 3
    log = (out / "train.log").read_text()
    assert "Resum" in log and "holds no fp32 master weights" not in log
    resumed = th.load(out / "checkpoint-3" / "optimizer.pt", weights_only=False)[MASTERS_KEY]
    assert any(
        not th.equal(a, b) for a, b in zip(masters, resumed, strict=True)
    )  # the copies moved on from the loaded ones

    cfg = make_cfg(*run, "training.max_steps=1", "training.save_steps=1", "training.master_weights=false")
    cfg.output_dir = str(out.parent / "plain")
    train(cfg)
    state = th.load(out.parent / "plain" / "checkpoint-1" / "optimizer.pt", weights_only=False)
    assert MASTERS_KEY not in state
    assert all(s["exp_avg"].dtype == th.bfloat16 for s in state["state"].values())


def test_the_bench_counts_the_updates_that_bf16_keeps():
    from bench.bf16_updates import changed_share

    weights = th.full((1000,), 0.1)  # bf16 spacing at 0.1 is 2**-11 ~ 0.00049: half of it is 0.00024
    assert changed_share(weights, 1e-4) == 0.0
    assert changed_share(weights, 1e-3) == 1.0
    mixed = th.cat([th.full((500,), 0.1), th.full((500,), 0.001)])  # spacing 2**-17 near 0.001: 1e-4 is kept
    assert changed_share(mixed, 1e-4) == pytest.approx(0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not th.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("_digit_reward")
def test_bf16_grpo_on_the_gpu_with_the_fast_sampler_steps_fp32_masters(make_cfg):
    """On a GPU (bf16 autocast, dtype auto -> bf16 weights, the fast sampler's CUDA graphs) the copies are stepped and
    written back in place: the final bf16 weights are the saved fp32 copies rounded."""
    from safetensors.torch import load_file

    cfg = make_cfg(
        "experiment=debug",
        "reward.funcs=[digit_share]",
        "reward.weights=[1.0]",
        "training.max_completion_length=12",
        "training.learning_rate=1e-4",
        "training.bf16=true",
        "model.model_kwargs.dtype=auto",
        "training.max_steps=3",
        "training.save_steps=3",
    )
    train(cfg)
    out = Path(cfg.output_dir)
    masters = th.load(out / "checkpoint-3" / "optimizer.pt", weights_only=False)[MASTERS_KEY]
    weights = load_file(out / "checkpoint-3" / "model.safetensors")
    by_shape = {}
    for w in weights.values():
        by_shape.setdefault(tuple(w.shape), []).append(w)
    assert masters
    for m in masters:  # every fp32 copy, rounded to bf16, is one of the saved bf16 weights
        assert any(th.equal(m.to(th.bfloat16).cpu(), w) for w in by_shape[tuple(m.shape)])
