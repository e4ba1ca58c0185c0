"""Generation alone (no training): the fast sampler vs transformers' generate on the Qwen3-0.6B shape.

    python bench/bench_sampler.py --batch 32 --tokens 512 --reasoning 0 151936

Prints milliseconds per decode step and completion tokens/s for each setting; random weights, bf16,
every completion forced to full length (min_new_tokens). ``--hf-tokens`` sets how many tokens the (slow)
transformers baseline generates (its per-token cost is flat enough to extrapolate).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_grpo import VOCAB, build_dataset, build_model, build_tokenizer  # noqa: E402


def timed(sync, fn, **kwargs):
    sync()
    t0 = time.perf_counter()
    out = fn(**kwargs)
    sync()
    return out, time.perf_counter() - t0


def main() -> None:
    import torch
    from omegaconf import OmegaConf

    from rlvr_vocab.config import ReasoningVocabConfig
    from rlvr_vocab.reasoning_vocab import extend_model
    from rlvr_vocab.sampling import FastSampler

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="*", default=[512])
    parser.add_argument("--reasoning", type=int, nargs="*", default=[0, VOCAB])
    parser.add_argument("--hf-tokens", type=int, default=64, help="tokens for the transformers baseline (0: skip)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", choices=["on", "off", "both"], default="on", help="torch.compile the decode step")
    args = parser.parse_args()

    sync = torch.cuda.synchronize
    tok = build_tokenizer(VOCAB)
    prompts = [r["prompt"] for r in build_dataset(args.batch)]
    for n in args.reasoning:
        model = build_model(tok).eval()
        vocab = None
        if n:
            vocab = extend_model(model, tok, n, OmegaConf.structured(ReasoningVocabConfig(repeat_policy="cycle")))
        inputs = tok(prompts, return_tensors="pt", padding=True).to("cuda")
        common = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
        if args.hf_tokens:
            L = args.hf_tokens
            _, t = timed(sync, model.generate, **inputs, **common, max_new_tokens=L, min_new_tokens=L)
            print(
                f"N={n:6d} transformers generate  B={args.batch} L={L}: {t:.2f} s, {1000 * t / L:.2f} ms/token-step, "
                f"{args.batch * L / t:,.0f} tok/s",
                flush=True,
            )
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
        for L, compiled in [(L, c) for L in args.tokens for c in modes]:
            sampler = FastSampler(reasoning_vocab=vocab, compile=compiled)
            for r in range(args.repeats):
                torch.cuda.reset_peak_memory_stats()
                out, t = timed(
                    sync,
                    model.generate,
                    **inputs,
                    **common,
                    max_new_tokens=L,
                    min_new_tokens=L,
                    custom_generate=sampler,
                )
                s = sampler.session
                graphs = len(s.graphs) if s is not None else "freed"
                print(
                    f"N={n:6d} fast sampler compile={compiled} (run {r}) B={args.batch} L={L}: {t:.2f} s, {1000 * t / L:.2f} ms/step, "
                    f"{args.batch * L / t:,.0f} tok/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
                    f"fast={sampler.last_used_fast_path}, graphs={graphs}, compile_failed={sampler._compile_failed}, "
                    f"out={tuple(out.shape)}",
                    flush=True,
                )
            del sampler
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
