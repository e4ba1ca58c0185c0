"""How much of an optimizer step survives in bf16 weights: the share of a model's weight elements that an update of
the learning rate's size changes when written straight into bf16 (``training.master_weights=false``), per lr.

    python -m bench.bf16_updates                                  # the embedded SmolLM2-135M-Instruct (CPU: 47 s on 2 cores)
    python -m bench.bf16_updates --lrs 1e-4 1e-5 3e-6 1e-6 model=qwen3_0.6b   # any model config (hub access)

Adam's first steps move each element by about the learning rate, with the gradient's sign; an element changes in
bf16 only if that is more than half the bf16 spacing around it. With ``training.master_weights=true`` (the default)
the update is kept in fp32 copies instead, and every element moves (rlvr_vocab/optim.py).
"""

from __future__ import annotations

import argparse

import torch as th


def changed_share(weights: th.Tensor, lr: float, seed: int = 0) -> float:
    """Share of ``weights``' elements that ``w + lr * sign`` changes once rounded to bf16."""
    low = weights.to(th.bfloat16)
    sign = th.sign(th.randn(weights.shape, generator=th.Generator().manual_seed(seed)))
    return float(((low.float() + lr * sign).to(th.bfloat16) != low).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-5, 3e-6, 1e-6], help="learning rates")
    parser.add_argument("overrides", nargs="*", help="config overrides (default: model=smollm2_135m)")
    args = parser.parse_args(argv)

    from pathlib import Path

    from hydra import compose, initialize_config_dir

    import rlvr_vocab.config  # noqa: F401  (registers the schema)
    from rlvr_vocab.models import load_model_and_tokenizer

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=smollm2_135m", *args.overrides])
    model, _ = load_model_and_tokenizer(cfg.model, cfg.paths.cache_dir, bf16=False, seed=cfg.seed)
    matrices = th.cat([p.detach().float().flatten() for p in model.parameters() if p.ndim == 2])
    print(
        f"{cfg.model.name_or_path}: {matrices.numel() / 1e6:.1f}M elements in 2-D weights, "
        f"median |w| {float(matrices.abs().median()):.4f}"
    )
    print("| lr | share of elements an lr-sized update changes in bf16 |\n|---|---|")
    for lr in args.lrs:
        print(f"| {lr:g} | {changed_share(matrices, lr):.4f} |")


if __name__ == "__main__":
    main()
