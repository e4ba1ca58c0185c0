"""GPU benchmark: GRPO steps of a Qwen3-0.6B-shaped model, ours (fast sampler) vs TRL's plain generate.

Each variant runs in its own process (clean peak-memory numbers) through the project's own trainer classes
(RLVRGRPOConfig / RLVRGRPOTrainer; with ``generation_backend=trl`` and N=0 that is TRL's GRPOTrainer path
unchanged). The model is built from a config with random weights (no download), bf16; every completion runs
to full length (``min_new_tokens = max_completion_length``, so EOS is suppressed in both backends alike).

    python bench/bench_grpo.py                         # every variant, table + bench/results/bench.json
    python bench/bench_grpo.py --variants fast-512 trl-512 --steps 3
    python bench/bench_grpo.py --list

Timing: a step is one optimizer step (32 completions generated, scored and trained on); the first
``--warmup`` steps (CUDA-graph capture, kernel selection) are excluded and the rest averaged, each step
bracketed by ``torch.cuda.synchronize()``. Peak memory is ``torch.cuda.max_memory_allocated()`` over the
whole run, warm-up included.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

QWEN3_06B = dict(  # Qwen/Qwen3-0.6B's config.json, minus the weights
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rope_theta=1000000,
    rms_norm_eps=1e-6,
)


@dataclass
class Variant:
    name: str
    backend: str  # fast | trl
    reasoning: int  # N reasoning rows (0 = baseline)
    completion: int  # tokens per completion
    micro_batch: int  # completions per micro-batch (32 // micro_batch accumulation steps)
    checkpointing: bool
    steps: int  # optimizer steps, warm-up included
    label: str


VOCAB = QWEN3_06B["vocab_size"]
VARIANTS = {
    v.name: v
    for v in [
        Variant("trl-512", "trl", 0, 512, 16, False, 3, "plain TRL (HF generate), baseline"),
        Variant("fast-512", "fast", 0, 512, 16, False, 6, "ours (fast sampler), baseline"),
        Variant("trl-512-rv", "trl", VOCAB, 512, 16, False, 3, "plain TRL (HF generate), vocab doubled"),
        Variant("fast-512-rv", "fast", VOCAB, 512, 16, False, 6, "ours, vocab doubled (reasoning)"),
        Variant("fast-2048", "fast", 0, 2048, 8, True, 4, "ours, 2,048 tokens, baseline, ckpt on"),
        Variant("fast-2048-rv", "fast", VOCAB, 2048, 8, True, 4, "ours, 2,048 tokens, vocab doubled, ckpt on"),
        Variant("fast-8192-rv", "fast", VOCAB, 8192, 8, True, 2, "ours, 8,192 tokens, vocab doubled, ckpt on"),
    ]
}
COMPLETIONS_PER_STEP = 32
NUM_GENERATIONS = 8
PROMPT_TOKENS = (48, 80)  # prompt length range (tokens), varied so that prompts are left-padded


# --------------------------------------------------------------------------------------------- pieces
def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with one token per model row ('t0' ... ), ChatML specials and think tags."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {f"t{i}": i for i in range(vocab_size - len(specials))}
    vocab.update({tok: vocab_size - len(specials) + i for i, tok in enumerate(specials)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    tok.padding_side = "left"
    return tok


TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8
)


def build_model(tok, seed: int = 0, tiny: bool = False):
    """Qwen3-0.6B's shape (bf16, on the GPU) or, with ``tiny``, a 2-layer model of the same vocabulary (CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    shape = {**QWEN3_06B, **TINY} if tiny else QWEN3_06B
    config = Qwen3Config(**shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    dtype, device = (torch.float32, "cpu") if tiny else (torch.bfloat16, "cuda")
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def build_dataset(n: int, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(*PROMPT_TOKENS)
        words = " ".join(f"t{rng.randrange(100, 150000)}" for _ in range(length))
        rows.append({"prompt": f"<|im_start|> {words} <|im_end|> <|im_start|> <think>"})
    return Dataset.from_list(rows)


def random_reward(completions, **kwargs):
    return [random.random() for _ in completions]


def run_variant(v: Variant, seed: int = 0, tiny: bool = False, gc_freeze: bool = False) -> dict:
    """Train ``v.steps`` optimizer steps; per-step wall time, generation time, peak memory.

    ``tiny``: a 2-layer model on the CPU with 16-token completions (a smoke test of this script).
    """
    import torch
    from omegaconf import OmegaConf
    from transformers import TrainerCallback

    from rlvr_vocab.config import ReasoningVocabConfig
    from rlvr_vocab.reasoning_vocab import extend_model
    from rlvr_vocab.trainer import RLVRGRPOConfig, RLVRGRPOTrainer

    cuda = torch.cuda.is_available() and not tiny
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if tiny:
        v = Variant(**{**asdict(v), "completion": 16, "micro_batch": 8})
    tok = build_tokenizer(VOCAB)
    model = build_model(tok, seed, tiny)
    vocab = None
    if v.reasoning:
        rcfg = OmegaConf.structured(ReasoningVocabConfig(repeat_policy="cycle"))
        vocab = extend_model(model, tok, v.reasoning, rcfg)
    args = RLVRGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{v.name}-"),
        max_steps=v.steps,
        per_device_train_batch_size=v.micro_batch,
        gradient_accumulation_steps=COMPLETIONS_PER_STEP // v.micro_batch,
        num_generations=NUM_GENERATIONS,
        max_completion_length=v.completion,
        generation_kwargs={"min_new_tokens": v.completion},  # full length in both backends
        generation_backend=v.backend,
        beta=0.0,
        learning_rate=1e-6,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=v.checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        disable_dropout=True,
    )
    steps = v.steps * COMPLETIONS_PER_STEP // NUM_GENERATIONS
    trainer = RLVRGRPOTrainer(
        model=model,
        reward_funcs=[random_reward],
        args=args,
        train_dataset=build_dataset(steps + 8, seed),
        processing_class=tok,
        reasoning_vocab=vocab,
    )

    step_times, gen_times, completion_tokens = [], [], []
    original_generate = trainer._generate_single_turn

    def timed_generate(*a, **k):
        sync()
        t0 = time.perf_counter()
        ids, logps = original_generate(*a, **k)
        sync()
        gen_times.append(time.perf_counter() - t0)
        completion_tokens.append(sum(len(c) for c in ids))
        return ids, logps

    trainer._generate_single_turn = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            step_times.append(time.perf_counter() - self.t0)
            print(f"[{v.name}] step {len(step_times)}: {step_times[-1]:.2f} s", flush=True)

    trainer.add_callback(StepTimer())
    gc_times, gc_start = [], {}

    def gc_timer(phase, info):  # Python's cyclic GC pauses the host (and so the GPU queue) on big heaps
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        elif "t" in gc_start:
            gc_times.append((len(step_times), info["generation"], time.perf_counter() - gc_start.pop("t")))

    gc.callbacks.append(gc_timer)
    if gc_freeze:
        gc.freeze()  # everything built so far (tokenizer, dataset, model) is never scanned again
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    fast_used = getattr(getattr(trainer, "_fast_sampler", None), "last_used_fast_path", False)
    return {
        "variant": v.name,
        "label": v.label,
        "config": asdict(v),
        "step_times_s": step_times,
        "generation_times_s": gen_times,
        "completion_tokens_per_step": completion_tokens,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0,
        "fast_path_used": bool(fast_used),
        "gc_pause_s_per_step": [sum(t for i, _, t in gc_times if i == k) for k in range(len(step_times))],
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------------ table
def summarise(result: dict, warmup: int) -> dict:
    if "error" in result:
        return {"variant": result["variant"], "label": result.get("label", ""), "error": result["error"]}
    times = result["step_times_s"][warmup:] or result["step_times_s"]
    gens = result["generation_times_s"][warmup:] or result["generation_times_s"]
    step = sum(times) / len(times)
    median = sorted(times)[len(times) // 2] if len(times) % 2 else sum(sorted(times)[len(times) // 2 - 1 :][:2]) / 2
    tokens = result["completion_tokens_per_step"][-1]
    return {
        "variant": result["variant"],
        "label": result["label"],
        "s_per_step": step,
        "s_per_step_median": median,
        "generation_s": sum(gens) / len(gens) if gens else None,
        "completion_tokens_per_s": tokens / step,
        "completion_tokens": tokens,
        "peak_gib": result["peak_allocated_gib"],
        "alloc_retries": result.get("alloc_retries", 0),
        "measured_steps": len(times),
        "fast_path_used": result["fast_path_used"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | what | s/step (mean) | median | of which generation (s) | completion tokens/s | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['label']} | {r['error']} | – | – | – | – |")
            continue
        lines.append(
            f"| {r['variant']} | {r['label']} | {r['s_per_step']:.2f} | {r['s_per_step_median']:.2f} | {r['generation_s']:.2f} | "
            f"{r['completion_tokens_per_s']:,.0f} | {r['peak_gib']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names (see --list)")
    parser.add_argument("--steps", type=int, default=None, help="override every variant's step count")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the averages")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "bench.json"), help="JSON results")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after setup (see BENCHMARKS.md)")
    parser.add_argument("--micro-batch", type=int, default=None, help="override every variant's micro-batch")
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU, 16 tokens (smoke test)")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.list:
        for v in VARIANTS.values():
            print(f"{v.name:14s} {v.label}")
        return
    if args.run_one:
        v = VARIANTS[args.run_one]
        if args.steps:
            v.steps = args.steps
        if args.micro_batch:
            v.micro_batch = args.micro_batch
        print("RESULT " + json.dumps(run_variant(v, tiny=args.tiny, gc_freeze=args.gc_freeze)), flush=True)
        return

    results = []
    for name in args.variants:
        cmd = [sys.executable, __file__, "--run-one", name] + (["--steps", str(args.steps)] if args.steps else [])
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--gc-freeze"] if args.gc_freeze else []
        cmd += ["--micro-batch", str(args.micro_batch)] if args.micro_batch else []
        print(f"=== {name}: {VARIANTS[name].label}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)
        lines = proc.stdout.splitlines()
        found = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
        for line in lines:
            if not line.startswith("RESULT ") and ("step " in line or "Error" in line or "error" in line):
                print("   " + line[:300], flush=True)
        if found:
            results.append(found[0])
        else:
            tail = "\n".join(lines[-15:])
            oom = "OutOfMemoryError" in proc.stdout
            print(tail, flush=True)
            results.append(
                {
                    "variant": name,
                    "label": VARIANTS[name].label,
                    "error": "OOM" if oom else f"failed (rc {proc.returncode})",
                }
            )
    rows = [summarise(r, args.warmup) for r in results]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": rows, "raw": results}, indent=1))
    print("\n" + table(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
