"""Correctness of the fast sampler where it runs fast: bf16, compiled, CUDA graphs (or small, on the CPU).

Three checks, each printing PASS or FAIL with its statistic:

* ``logprobs``: the sampler's processed log-probs of the tokens it sampled (``last_logprobs``) against the
  trainer's recomputation for the same completions (``RLVRGRPOTrainer._get_per_token_logps_and_entropies``,
  temperature 1): mean and max |delta log p|. Rows end at lengths spread from 10% to 100% (the sampler's
  forced-EOS hook, where it has one), so finished rows and their compaction are exercised; the forced EOS
  itself is left out. The output head is scaled (``--logit-scale``) so that the distributions are peaked
  (a random model's are nearly uniform, where a wrong row or position would hardly show).
* ``mask`` (with the vocabulary doubled, in the same run as a second ``logprobs``; on the GPU a 4-layer
  model of the same width, ``--mask-layers``, for a shorter compile): half the prompts end with the
  ``<think>`` span open, half with it closed; no reasoning id may be sampled outside a span, and some
  must be inside.
* ``distribution``: a 2-layer model with a 64-token vocabulary; token counts per position over ``--rows``
  samples of one prompt from the fast sampler vs transformers' ``generate`` (EOS allowed, so finished rows
  count too), a two-sample chi-square test per position (Bonferroni over positions, alpha 1e-3) and the
  total-variation distance against its sampling-noise level. Two settings (temperature 1; temperature 0.7
  with top-k 20 and top-p 0.9). A power check runs the same test against ``generate`` at temperature 1.25
  (1.5 with ``--tiny``'s fewer samples), which it must reject, or the check fails.

    python -m bench.check_sampler                      # GPU, full size (~2 min with a cold compile cache)
    python -m bench.check_sampler --tiny               # CPU, small (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

from bench.workload import (
    TINY_VOCAB,
    VOCAB,
    build_model,
    build_prompts,
    build_tokenizer,
    completion_lengths,
    force_eos,
    make_sampler,
    random_reward,
    session_paths,
    spread_lengths,
    timed,
    write_json,
)

ALPHA = 1e-3  # family-wise significance of the distribution test
MEAN_DLOGP_MAX = 0.05  # logprobs check: mean |delta log p| above this fails (bf16 noise is ~0.01)
MAX_DLOGP_MAX = 2.0  # ... and any single token above this (a wrong row or position gives several nats)


# ------------------------------------------------------------------------------------------ statistics
def chi2_sf(x: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty normal approximation, good for dof >= 3).

    Example:
        >>> round(chi2_sf(30.58, 15), 3)  # scipy: 0.010
        0.01
    """
    if dof <= 0:
        return 1.0
    z = ((x / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi2_homogeneity(a: list[int], b: list[int], min_expected: float = 5.0) -> tuple[float, int]:
    """Two-sample chi-square statistic and degrees of freedom; bins with a small expected count are merged.

    Example:
        >>> chi2_homogeneity([50, 50], [50, 50])
        (0.0, 1)
        >>> round(chi2_homogeneity([60, 40], [40, 60])[0], 2)
        8.0
    """
    na, nb = sum(a), sum(b)
    n = na + nb
    bins, rare = [], [0, 0]
    for x, y in zip(a, b, strict=True):
        if (x + y) * min(na, nb) / n < min_expected:
            rare[0] += x
            rare[1] += y
        else:
            bins.append((x, y))
    if sum(rare):
        bins.append(tuple(rare))
    stat = 0.0
    for x, y in bins:
        for obs, m in ((x, na), (y, nb)):
            e = (x + y) * m / n
            stat += (obs - e) ** 2 / e if e else 0.0
    return stat, max(len(bins) - 1, 0)


def tv_distance(a: list[int], b: list[int]) -> tuple[float, float]:
    """Total-variation distance of two count vectors, and its expected value under the same law (noise).

    Example:
        >>> tv_distance([10, 0], [0, 10])[0]
        1.0
    """
    na, nb = sum(a), sum(b)
    tv = 0.5 * sum(abs(x / na - y / nb) for x, y in zip(a, b, strict=True))
    pooled = [(x + y) / (na + nb) for x, y in zip(a, b, strict=True)]
    noise = 0.5 * sum(math.sqrt(2 / math.pi * p * (1 - p) * (1 / na + 1 / nb)) for p in pooled)
    return tv, noise


def compare_samples(x, y, categories: int) -> dict:
    """Per-position chi-square p-values and TV distances of two [rows, positions] token tensors."""
    import torch as th

    positions = []
    for t in range(min(x.shape[1], y.shape[1])):
        a = th.bincount(x[:, t].cpu(), minlength=categories).tolist()
        b = th.bincount(y[:, t].cpu(), minlength=categories).tolist()
        stat, dof = chi2_homogeneity(a, b)
        tv, noise = tv_distance(a, b)
        positions.append({"chi2": round(stat, 2), "dof": dof, "p": chi2_sf(stat, dof), "tv": tv, "tv_noise": noise})
    p_min = min(p["p"] for p in positions)
    return {
        "positions": positions,
        "p_min": p_min,
        "reject": p_min < ALPHA / len(positions),
        "tv_max": max(p["tv"] for p in positions),
        "tv_over_noise_max": max(p["tv"] / p["tv_noise"] for p in positions if p["tv_noise"]),
    }


# ------------------------------------------------------------------------------------------ the checks
def _inputs(tok, prompts: list[str], device: str):
    return tok(prompts, return_tensors="pt", padding=True).to(device)


def _trainer(model, tok, vocab, tokens: int, cuda: bool):
    """An RLVRGRPOTrainer around ``model`` (for its log-prob recomputation; it never trains here)."""
    from datasets import Dataset

    from rlvr_vocab.trainer import RLVRGRPOConfig, RLVRGRPOTrainer, checkpointing_field

    args = RLVRGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="check-sampler-"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=tokens,
        temperature=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        beta=0.0,
        disable_dropout=True,
        **{checkpointing_field(): True},  # GRPOConfig's default, by the name this transformers takes silently
    )
    return RLVRGRPOTrainer(
        model=model,
        reward_funcs=[random_reward],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "t1"}] * 4),
        processing_class=tok,
        reasoning_vocab=vocab,
    )


def logprob_check(
    tiny: bool,
    reasoning: bool,
    batch: int,
    tokens: int,
    logit_scale: float,
    attention,
    seed=0,
    layers=None,
    options: dict | None = None,
) -> dict:
    """Sample with the fast sampler, recompute the log-probs with the trainer, compare (and check the mask).

    ``layers``: fewer decoder layers than the Qwen3-0.6B shape (a cheaper compile; the mask does not need depth);
    ``options``: more FastSampler options (``fold``).
    """
    import torch as th
    from omegaconf import OmegaConf

    from rlvr_vocab.config import ReasoningVocabConfig
    from rlvr_vocab.reasoning_vocab import extend_model

    cuda = th.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    vocab_size = TINY_VOCAB if tiny else VOCAB
    tok = build_tokenizer(vocab_size)
    model = build_model(tok, seed, tiny, **({"num_hidden_layers": layers} if layers else {})).eval()
    with th.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    vocab = None
    prompts = build_prompts(batch, seed, vocab_size)
    if reasoning:
        rcfg = OmegaConf.structured(ReasoningVocabConfig(repeat_policy="cycle"))
        vocab = extend_model(model, tok, vocab_size, rcfg)
        prompts = [p + (" t1 </think>" if i % 2 else "") for i, p in enumerate(prompts)]  # odd rows: span closed
    sampler = make_sampler(vocab, attention=attention, **(options or {}))
    lengths = spread_lengths(batch, tokens, 0.1, seed)
    hook = force_eos(sampler, lengths, tok.eos_token_id)
    inputs = _inputs(tok, prompts, device)
    sync = th.cuda.synchronize if cuda else (lambda: None)
    out, t = timed(
        sync,
        model.generate,
        **inputs,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=tokens,
        pad_token_id=tok.pad_token_id,
        custom_generate=sampler,
    )
    force_eos(sampler, None, tok.eos_token_id)
    p = inputs["input_ids"].shape[1]
    completions = out[:, p:]
    got = completion_lengths(completions, [tok.eos_token_id])
    result = {
        "check": "logprobs" + ("+mask" if reasoning else ""),
        "layers": model.config.num_hidden_layers,
        "batch": batch,
        "tokens": tokens,
        "reasoning": reasoning,
        "attention": attention or "default",
        "sample_s": round(t, 2),
        "fast_path": bool(getattr(sampler, "last_used_fast_path", False)),
        "paths": session_paths(sampler),  # what ran: attention, pick, projections, folded norms
        "eos_hook": hook,
        "lengths_min_max": [min(got), max(got)],
    }
    sampled_logp = getattr(sampler, "last_logprobs", None)
    del sampler
    if cuda:
        th.cuda.empty_cache()

    # --- the trainer's recomputation
    trainer = _trainer(model, tok, vocab, tokens, cuda)
    n = completions.shape[1]
    positions = th.arange(n, device=completions.device)[None, :]
    got_t = th.tensor(got, device=completions.device)[:, None]
    completion_mask = (positions < got_t).long()
    ids = th.cat([inputs["input_ids"], completions], 1)
    mask = th.cat([inputs["attention_mask"], completion_mask], 1)
    with th.no_grad():
        logps, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, n, batch_size=4)[:2]
    compared = positions < got_t
    if hook:  # the forced EOS is the hook's choice, not the model's: leave it out
        forced = th.tensor(lengths, device=completions.device)[:, None]
        compared &= ~((positions == forced - 1) & (got_t == forced))
    if sampled_logp is None:
        result.update({"pass": None, "note": "the sampler has no last_logprobs"})
    else:
        delta = (sampled_logp[:, :n].float().to(logps.device) - logps.float()).abs()[compared]
        result.update(
            {
                "compared_tokens": int(compared.sum()),
                "mean_abs_dlogp": float(delta.mean()),
                "max_abs_dlogp": float(delta.max()),
                "p99_abs_dlogp": float(delta.quantile(0.99)) if delta.numel() < 2**24 else None,
                "mean_neg_logp": float(-logps.float()[compared].mean()),
            }
        )
        result["pass"] = result["mean_abs_dlogp"] <= MEAN_DLOGP_MAX and result["max_abs_dlogp"] <= MAX_DLOGP_MAX
    if reasoning:
        result.update(mask_check(vocab, inputs["input_ids"], completions, got))
        result["pass"] = bool(result["pass"] is not False and result["mask_pass"])
    del trainer, model
    if cuda:
        th.cuda.empty_cache()
    return result


def mask_check(vocab, prompt_ids, completions, lengths: list[int]) -> dict:
    """Reasoning ids outside the span (must be 0) and inside it (must be > 0), over the completions' tokens."""
    import torch as th

    ids = th.cat([prompt_ids, completions], 1).cpu()
    inside = vocab.span_state(ids)[:, prompt_ids.shape[1] - 1 : -1]  # the state each completion token saw
    comp = completions.cpu()
    valid = th.arange(comp.shape[1])[None, :] < th.tensor(lengths)[:, None]
    reasoning = vocab.is_reasoning(comp) & valid
    outside = int((reasoning & ~inside).sum())
    within = int((reasoning & inside).sum())
    return {
        "reasoning_outside_span": outside,
        "reasoning_inside_span": within,
        "tokens_inside_span": int((inside & valid).sum()),
        "mask_pass": outside == 0 and within > 0,
    }


def distribution_check(
    tiny: bool,
    rows: int,
    tokens: int,
    attention,
    seed: int = 0,
    power_temperature: float = 1.25,
    options: dict | None = None,
) -> dict:
    """Token frequencies per position, fast sampler vs ``generate``, for two sampling settings (+ a power check);
    ``options``: more FastSampler options (``fold``)."""
    import torch as th

    cuda = th.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    tok = build_tokenizer(64)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    small.update(num_key_value_heads=2, head_dim=16, initializer_range=0.25, tie_word_embeddings=False)
    model = build_model(tok, seed, device=device, **small).eval()
    inputs = _inputs(tok, ["<|im_start|> t1 t2 t3 <|im_end|> <|im_start|>"] * rows, device)
    p = inputs["input_ids"].shape[1]
    settings = {"T=1": dict(temperature=1.0, top_k=0, top_p=1.0), "T=0.7,k=20,p=0.9": dict(temperature=0.7, top_k=20)}
    settings["T=0.7,k=20,p=0.9"]["top_p"] = 0.9
    result = {"check": "distribution", "rows": rows, "tokens": tokens, "attention": attention or "default"}

    def sample(sampler, **kw):
        # independent draws: torch's multinomial is the same exponential race as the sampler's, so one seed
        # for both would give identical tokens, not two samples
        th.manual_seed(seed + 1000 * (sampler is None) + int(100 * kw["temperature"]))
        out = model.generate(**inputs, do_sample=True, max_new_tokens=tokens, pad_token_id=tok.pad_token_id,
                             custom_generate=sampler, **kw)  # fmt: skip
        done = out[:, p:]
        if done.shape[1] < tokens:  # every row ended early: pad the rest as generate does
            done = th.nn.functional.pad(done, (0, tokens - done.shape[1]), value=tok.pad_token_id)
        return done

    ok = True
    for name, kw in settings.items():
        sampler = make_sampler(attention=attention, compile=None, **(options or {}))
        fast = sample(sampler, **kw)
        hf = sample(None, **kw)
        cmp = compare_samples(fast, hf, len(tok))
        entropy = _entropy(model, inputs, tok)
        result[name] = {k: v for k, v in cmp.items() if k != "positions"}
        result[name]["positions"] = [{k: round(v, 5) for k, v in q.items()} for q in cmp["positions"]]
        result[name]["first_token_entropy_nats"] = entropy
        result[name]["paths"] = session_paths(sampler)
        result[name]["eos_rows"] = int((fast == tok.eos_token_id).any(1).sum())
        ok &= not cmp["reject"]
        if name == "T=1":  # power: the same test must tell temperature 1 from a hotter one
            hot = sample(None, **{**kw, "temperature": power_temperature})
            power = compare_samples(fast, hot, len(tok))
            result["power"] = {"temperature": power_temperature, "p_min": power["p_min"], "reject": power["reject"]}
            result["power_ok"] = bool(power["reject"])
    result["pass"] = bool(ok and result.get("power_ok"))  # a test that cannot reject proves nothing
    return result


def _entropy(model, inputs, tok) -> float:
    import torch as th

    with th.no_grad():
        logits = model(**{k: v[:1] for k, v in inputs.items()}).logits[0, -1].float()
    logp = logits.log_softmax(-1)
    return round(float(-(logp.exp() * logp).sum()), 3)


# ------------------------------------------------------------------------------------------ report
def verdict_lines(results: list[dict]) -> list[str]:
    """One PASS/FAIL line per check."""
    lines = []
    for r in results:
        tag = {True: "PASS", False: "FAIL", None: "SKIP"}[r.get("pass")] if "error" not in r else "ERROR"
        if "error" in r:
            lines.append(f"{tag} {r['check']}: {r['error']}")
        elif r["check"].startswith("logprobs"):
            text = (
                f"{tag} {r['check']} ({r['attention']}, {r.get('layers', '?')} layers, {r['batch']} x {r['tokens']}, rows end "
                f"{r['lengths_min_max'][0]}-{r['lengths_min_max'][1]}, eos hook {r['eos_hook']}): "
            )
            if "mean_abs_dlogp" in r:
                text += (
                    f"mean |dlogp| {r['mean_abs_dlogp']:.4f} (<= {MEAN_DLOGP_MAX}), max {r['max_abs_dlogp']:.3f} "
                    f"(<= {MAX_DLOGP_MAX}) over {r['compared_tokens']:,} tokens, mean -logp {r['mean_neg_logp']:.2f}"
                )
            else:
                text += r.get("note", "")
            if "mask_pass" in r:
                text += (
                    f"; mask: {r['reasoning_outside_span']} reasoning ids outside the span (must be 0), "
                    f"{r['reasoning_inside_span']:,} of {r['tokens_inside_span']:,} inside (must be > 0)"
                )
            lines.append(text)
        elif r["check"] == "distribution":
            parts = []
            for name in ("T=1", "T=0.7,k=20,p=0.9"):
                if name in r:
                    s = r[name]
                    parts.append(
                        f"{name}: min p {s['p_min']:.3g}, max TV {s['tv_max']:.3f} "
                        f"({s['tv_over_noise_max']:.1f}x noise), entropy {s['first_token_entropy_nats']:.2f}"
                    )
            power = r.get("power", {})
            lines.append(
                f"{tag} distribution ({r['attention']}, {r['rows']:,} rows x {r['tokens']}): "
                + "; ".join(parts)
                + f"; power check vs T={power.get('temperature')}: {'rejected' if r.get('power_ok') else 'NOT rejected'}"
                f" (p {power.get('p_min', float('nan')):.3g})"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small models on the CPU (seconds)")
    parser.add_argument("--checks", nargs="*", default=["logprobs", "distribution", "mask"], help="which, in order")
    parser.add_argument(
        "--attention",
        default="auto",
        help="sampler attention path: auto (Triton on CUDA when it checks out, else eager) | triton | eager",
    )
    parser.add_argument("--fold", default=None, help="FastSampler(fold=...): auto | on | off (default: its default)")
    parser.add_argument("--batch", type=int, default=None, help="logprobs rows (default 32; tiny 8)")
    parser.add_argument("--tokens", type=int, default=None, help="logprobs tokens (default 512; tiny 16)")
    parser.add_argument("--rows", type=int, default=None, help="distribution samples (default 4096; tiny 1024)")
    parser.add_argument("--dist-tokens", type=int, default=None, help="distribution tokens per sample (8; tiny 4)")
    parser.add_argument("--logit-scale", type=float, default=6.0, help="output-head scale (peaked distributions)")
    parser.add_argument("--mask-layers", type=int, default=4, help="decoder layers of the mask check's model (GPU)")
    parser.add_argument("--deadline", type=float, default=None, help="unix time: skip checks after it")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    from bench.workload import sampler_options

    attention = args.attention if sampler_options()["attention"] else None
    options = {"fold": args.fold} if args.fold else {}
    batch = args.batch or (8 if args.tiny else 32)
    tokens = args.tokens or (16 if args.tiny else 512)
    rows = args.rows or (1024 if args.tiny else 4096)
    power_t = 1.5 if args.tiny else 1.25  # the hotter law the power check must reject (fewer rows: hotter)
    results = []
    for check in args.checks:
        if args.deadline and time.time() > args.deadline:
            results.append({"check": check, "error": "skipped: deadline", "pass": None})
            continue
        t0 = time.perf_counter()
        try:
            if check == "logprobs":
                r = logprob_check(args.tiny, False, batch, tokens, args.logit_scale, attention, options=options)
            elif check == "mask":
                layers = None if args.tiny else args.mask_layers
                r = logprob_check(
                    args.tiny, True, batch, tokens, args.logit_scale, attention, layers=layers, options=options
                )
            elif check == "distribution":
                r = distribution_check(
                    args.tiny,
                    rows,
                    args.dist_tokens or (4 if args.tiny else 8),
                    attention,
                    power_temperature=power_t,
                    options=options,
                )
            else:
                raise ValueError(f"unknown check {check!r} (logprobs, distribution, mask)")
        except Exception as err:  # noqa: BLE001 - record it and go on
            r = {"check": check, "error": repr(err)[:400], "pass": False}
        r["check_s"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        print(verdict_lines([r])[0], flush=True)
        if args.out:
            write_json(args.out, results)
    print(
        "RESULT " + json.dumps([{k: v for k, v in r.items() if k not in ("T=1", "T=0.7,k=20,p=0.9")} for r in results])
    )
    return 0 if all(r.get("pass") is not False for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
