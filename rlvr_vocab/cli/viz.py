"""rlvr-viz: PNGs of a reasoning-vocabulary run, from its run dir.

    rlvr-viz outputs/reasoning/<run>                      # writes <run>/viz/{usage,drift,sample}.png
    rlvr-viz outputs/reasoning/<run> --prompt "What is 7+5?" --max-new-tokens 128 --out figs/

usage.png   share of completion tokens drawn from the reasoning rows (and inside the span), per step
drift.png   cosine between each reasoning row and its source row, across checkpoints (1 = still a copy);
            drift.json holds the plotted numbers (mean, 5th percentile, min per matrix and checkpoint step)
sample.png  one sampled completion of the final model, reasoning tokens marked in colour (+ sample.txt)

It reads files only (metrics.jsonl, checkpoint safetensors, reasoning_vocab.json), so it needs no
config groups; sampling the final model is the only step that loads a model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch as th

from rlvr_vocab.checkpoints import checkpoint_dirs
from rlvr_vocab.reasoning_vocab import MAP_FILE, ReasoningVocab


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_line_plot(plt, fig, ax, path: Path) -> Path:
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_usage(run_dir: Path, out: Path) -> Path | None:
    rows = [r for r in read_metrics(run_dir) if "reasoning/token_fraction" in r]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["reasoning/token_fraction"] for r in rows], marker="o", label="reasoning-vocab tokens")
    if "reasoning/inside_span_fraction" in rows[0]:
        ax.plot(steps, [r["reasoning/inside_span_fraction"] for r in rows], marker=".", label="tokens inside <think>")
    ax.set(
        xlabel="training step", ylabel="fraction of completion tokens", ylim=(0, 1.02), title="Reasoning-vocab usage"
    )
    return _save_line_plot(plt, fig, ax, out / "usage.png")


def _rows_of(folder: Path, total_rows: int) -> dict[str, th.Tensor]:
    """The embedding and (untied) output-head matrices of a saved model, read from its safetensors."""
    from safetensors import safe_open

    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if len(shape) == 2 and shape[0] == total_rows:
                    kind = "embedding" if "embed" in key else "output head"
                    found.setdefault(kind, f.get_tensor(key).float())
    return found


def drift(folder: Path, vocab: ReasoningVocab) -> dict[str, th.Tensor]:
    """Per matrix: cosine(reasoning row i, its source row) in this checkpoint."""
    result = {}
    for kind, weight in _rows_of(folder, vocab.standard_size + vocab.size).items():
        rows, sources = weight[vocab.standard_size :], weight[vocab.source_ids]
        result[kind] = th.nn.functional.cosine_similarity(rows, sources, dim=-1)
    return result


def plot_drift(run_dir: Path, vocab: ReasoningVocab, out: Path) -> Path | None:
    points = [(step, drift(folder, vocab)) for step, folder in checkpoint_dirs(run_dir)]
    points = [(s, d) for s, d in points if d]
    if not points:
        return None
    summary = {  # the plotted numbers, for reports: per matrix, per checkpoint step
        kind: [
            {
                "step": s,
                "mean": float(d[kind].mean()),
                "p05": float(d[kind].quantile(0.05)),
                "min": float(d[kind].min()),
            }
            for s, d in points
        ]
        for kind in points[0][1]
    }
    (out / "drift.json").write_text(json.dumps(summary, indent=1) + "\n")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in points[0][1]:
        steps = [s for s, d in points]
        mean = [float(d[kind].mean()) for _, d in points]
        low = [float(d[kind].quantile(0.05)) for _, d in points]
        ax.plot(steps, mean, marker="o", label=f"{kind}: mean")
        ax.plot(steps, low, linestyle="--", label=f"{kind}: 5th percentile")
    ax.set(xlabel="checkpoint step", ylabel="cosine(reasoning row, source row)", title="Drift of the reasoning rows")
    ax.ticklabel_format(axis="y", useOffset=False)
    return _save_line_plot(plt, fig, ax, out / "drift.png")


def sample_completion(
    run_dir: Path, prompt: str, max_new_tokens: int, seed: int = 0, open_span: bool = False
) -> tuple[list[int], object]:
    """Sample one completion from the run's final model (the span mask applies, as in training)."""
    from rlvr_vocab.reasoning_vocab import load_checkpoint

    model, tokenizer = load_checkpoint(run_dir)
    messages = [{"role": "user", "content": prompt}]
    system = _run_config(run_dir).get("dataset", {}).get("system_prompt")
    if system:  # the run's own system prompt, so the sample is drawn as in training
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prefix = model.reasoning_vocab.think_open if open_span else ""
    ids = tokenizer(text + prefix, return_tensors="pt", add_special_tokens=False)
    th.manual_seed(seed)
    with th.no_grad():
        out = model.generate(**ids, do_sample=True, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    completion = out[0, ids["input_ids"].shape[1] :].tolist()
    if open_span:
        completion = tokenizer(prefix, add_special_tokens=False).input_ids + completion
    return completion, tokenizer


def _run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def plot_sample(tokens: list[int], tokenizer, vocab: ReasoningVocab, out: Path, width: int = 90) -> Path:
    """Draw the completion token by token in a monospace grid, reasoning tokens in red."""
    plt = _plt()
    pieces = []
    for t in tokens:
        is_reasoning = t >= vocab.standard_size
        text = tokenizer.decode([vocab.to_source([t])[0]])
        pieces.append((text, is_reasoning))
    lines, line, col = [], [], 0
    for text, is_reasoning in pieces:
        for j, part in enumerate(text.split("\n")):
            if j > 0 or col + len(part) > width:
                lines.append(line)
                line, col = [], 0
            line.append((col, part, is_reasoning))
            col += len(part)
    lines.append(line)
    height = 0.9 + 0.22 * len(lines)
    fig = plt.figure(figsize=(0.085 * width + 0.6, height))
    n_reasoning = sum(r for _, r in pieces)
    fig.text(
        0.01,
        1 - 0.25 / height,
        f"{len(tokens)} tokens, {n_reasoning} from the reasoning vocabulary (red)",
        fontsize=9,
        family="monospace",
        va="top",
    )
    for i, segments in enumerate(lines):
        y = 1 - (0.55 + 0.22 * i) / height
        for col, part, is_reasoning in segments:
            x = 0.01 + col * 0.085 / (0.085 * width + 0.6)
            fig.text(
                x,
                y,
                part,
                fontsize=9,
                family="monospace",
                va="top",
                color="crimson" if is_reasoning else "black",
                weight="bold" if is_reasoning else "normal",
            )
    fig.savefig(out / "sample.png", dpi=120)
    plt.close(fig)
    (out / "sample.txt").write_text(vocab.render(tokenizer, tokens))
    return out / "sample.png"


def visualize(
    run_dir: str | Path,
    out: str | Path | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 64,
    seed: int = 0,
    open_span: bool = False,
) -> list[Path]:
    """Write usage.png, drift.png and sample.png for a run dir; returns the files written."""
    run_dir = Path(run_dir)
    vocab = ReasoningVocab.load(run_dir) or next(
        (v for v in (ReasoningVocab.load(p) for _, p in checkpoint_dirs(run_dir)) if v),
        None,
    )
    if vocab is None:
        raise SystemExit(f"{run_dir}: no {MAP_FILE} in the run dir or its checkpoints (was reasoning_vocab_size > 0?)")
    out = Path(out) if out else run_dir / "viz"
    out.mkdir(parents=True, exist_ok=True)
    written = [p for p in (plot_usage(run_dir, out), plot_drift(run_dir, vocab, out)) if p]
    if (run_dir / "config.json").is_file():
        if prompt is None:
            prompt = "What is 7 + 5? Think inside <think> </think>, then put the answer in \\boxed{}."
        tokens, tokenizer = sample_completion(run_dir, prompt, max_new_tokens, seed, open_span)
        written.append(plot_sample(tokens, tokenizer, vocab, out))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlvr-viz", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run's output dir (holds metrics.jsonl and checkpoint-N/)")
    parser.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/viz)")
    parser.add_argument("--prompt", help="user message for the rendered sample")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the rendered sample")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for the rendered sample")
    parser.add_argument("--open-span", action="store_true", help="start the sample inside <think> (untrained models)")
    args = parser.parse_args(argv)
    for path in visualize(args.run_dir, args.out, args.prompt, args.max_new_tokens, args.seed, args.open_span):
        print(path)


if __name__ == "__main__":
    main()
