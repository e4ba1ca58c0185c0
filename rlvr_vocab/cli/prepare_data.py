"""rlvr-prepare-data: on a machine with internet (a login node), cache the model and export the dataset,
so that compute nodes train offline.

    rlvr-prepare-data model=qwen3_0.6b dataset=gsm8k                 # -> data/gsm8k/ (output_dir= to choose)
    # then, on a compute node without internet:
    HF_HUB_OFFLINE=1 python grpo_train.py model=qwen3_0.6b dataset=gsm8k \\
        dataset.path=data/gsm8k/train.parquet dataset.eval_path=data/gsm8k/test.parquet \\
        dataset.problem_key=problem dataset.answer_format=plain       # (printed at the end, also in manifest.json)

What it does:
  * model: ``model.source=hub`` downloads tokenizer and weights into the Hugging Face cache
    (``HF_HOME``) and loads them once to check; ``gguf`` converts the embedded GGUF into ``paths.cache_dir``;
    ``tiny`` is built in code and needs nothing.
  * dataset: reads the configured source (hub, ``dataset.path`` file, or the generated arithmetic set),
    extracts the gold answers as training does, and writes every row, in source order, to
      ``<out>/<split>.parquet``       our columns: problem, answer (gold final answer), prompt (chat messages)
      ``<out>/verl/<split>.parquet``  VERL's GSM8K layout: data_source, prompt, ability, reward_model, extra_info
    ``dataset.max_train_samples`` / ``max_eval_samples`` are not applied: training applies them to the
    exported file exactly as to the source (same rows, same seeded shuffle).
  * ``<out>/manifest.json`` lists the files, row counts, the model location and the offline overrides.

VERL picks its reward by ``data_source``; for ``openai/gsm8k`` its scorer reads a ``#### N`` answer, while
our prompts ask for ``\\boxed{}``: give VERL a boxed scorer (``custom_reward_function``) or change
``dataset.prompt_template`` before exporting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig

from rlvr_vocab.config import ConfigError


# ------------------------------------------------------------------------------------------ model
def cache_model(cfg: DictConfig) -> str:
    """Download (hub), convert (gguf) or nothing (tiny); returns where the model now lives."""
    import torch as th
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlvr_vocab.models import convert_gguf

    m = cfg.model
    if m.source == "tiny":
        return "built in code (model.source=tiny): nothing to cache"
    if m.source == "gguf":
        path = convert_gguf(m, cfg.paths.cache_dir)
        AutoTokenizer.from_pretrained(path)
        return str(path)
    if m.source != "hub":
        raise ConfigError(f"model.source={m.source!r}: choose hub, gguf or tiny.")
    logger.info(f"Downloading {m.name_or_path} (revision {m.revision or 'main'}) into the Hugging Face cache")
    AutoTokenizer.from_pretrained(m.name_or_path, revision=m.revision)
    # load once in bf16 to check the weights (half the memory of fp32; no attention kernel needed)
    model = AutoModelForCausalLM.from_pretrained(m.name_or_path, revision=m.revision, dtype=th.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    logger.info(f"Cached {m.name_or_path}: {n_params / 1e6:.0f}M parameters")
    return m.name_or_path


# ------------------------------------------------------------------------------------------ dataset
def raw_splits(cfg: DictConfig) -> dict[str, Any]:
    """``{split name: raw HF dataset}`` of the configured source, training split first."""
    import datasets

    from rlvr_vocab.data import LOCAL_FORMATS, generate_arithmetic

    d = cfg.dataset
    if d.name == "arithmetic" and not d.path:
        train, held_out = generate_arithmetic(
            d.generator, d.generator.seed if d.generator.seed is not None else cfg.seed
        )
        return {
            d.split: datasets.Dataset.from_list(train),
            d.eval_split or "test": datasets.Dataset.from_list(held_out),
        }

    def load(path: str | None, split: str | None):
        if path:
            if not Path(path).is_file() or Path(path).suffix.lower() not in LOCAL_FORMATS:
                raise ConfigError(f"dataset file {path!r} is missing or not .jsonl/.json/.parquet/.csv.")
            return datasets.load_dataset(LOCAL_FORMATS[Path(path).suffix.lower()], data_files=str(path), split="train")
        if not d.hub_id:
            raise ConfigError(f"dataset {d.name!r} has neither dataset.path nor dataset.hub_id set.")
        return datasets.load_dataset(d.hub_id, d.hub_config, split=split)

    splits = {d.split: load(d.path, d.split)}
    if d.eval_path or (d.eval_split and not d.path):
        splits[d.eval_split or "test"] = load(d.eval_path, d.eval_split)
    return splits


def verl_rows(rows, split: str, data_source: str, raw_answers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows in VERL's GSM8K parquet layout (its examples/data_preprocess/gsm8k.py), with our prompt and gold.

    ``extra_info.answer`` is the source's raw answer for the problem (GSM8K: the worked solution), as in
    VERL's script; ``reward_model.ground_truth`` is the gold final answer.
    """
    raw_answers = raw_answers or {}
    return [
        {
            "data_source": data_source,
            "prompt": row["prompt"],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
            "extra_info": {
                "split": split,
                "index": i,
                "answer": raw_answers.get(row["problem"], row["answer"]),
                "question": row["problem"],
            },
        }
        for i, row in enumerate(rows)
    ]


def export_dataset(cfg: DictConfig, out: Path) -> dict[str, dict[str, Any]]:
    """Write our and VERL's parquet files for every split; returns ``{split: {rows, file, verl_file}}``."""
    import datasets

    from rlvr_vocab.data import to_prompt_rows

    d = cfg.dataset
    data_source = d.hub_id or f"rlvr_vocab/{d.name}"
    (out / "verl").mkdir(parents=True, exist_ok=True)
    exported = {}
    for split, raw in raw_splits(cfg).items():
        rows = to_prompt_rows(raw, d, f"{split} split")  # gold answers extracted, unparseable rows dropped
        ours = out / f"{split}.parquet"
        rows.to_parquet(str(ours))
        raw_answers = {str(p): str(a) for p, a in zip(raw[d.problem_key], raw[d.answer_key], strict=True)}
        verl = out / "verl" / f"{split}.parquet"
        datasets.Dataset.from_list(verl_rows(rows, split, data_source, raw_answers)).to_parquet(str(verl))
        exported[split] = {"rows": len(rows), "file": str(ours), "verl_file": str(verl)}
        logger.info(f"{split}: {len(rows)} rows -> {ours} and {verl}")
    return exported


def offline_overrides(exported: dict[str, dict[str, Any]]) -> list[str]:
    """The command-line overrides that train on the exported files, after the ones this command was given."""
    files = list(exported.values())
    given = []
    try:  # the groups and keys of this command (model=..., dataset=...), when run as a Hydra app
        from hydra.core.hydra_config import HydraConfig

        replaced = ("dataset.path", "dataset.eval_path", "output_dir", "hydra")
        given = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(replaced)]
    except ValueError:  # composed without the app (tests)
        pass
    overrides = [*given, f"dataset.path={files[0]['file']}"]
    if len(files) > 1:
        overrides.append(f"dataset.eval_path={files[1]['file']}")
    return overrides + ["dataset.problem_key=problem", "dataset.answer_key=answer", "dataset.answer_format=plain"]


# ------------------------------------------------------------------------------------------ entry point
def prepare_data(cfg: DictConfig) -> dict[str, Any]:
    """Cache the model, export the dataset, write the manifest; returns the manifest."""
    out = Path(cfg.output_dir or Path("data") / cfg.dataset.name)
    exported = export_dataset(cfg, out)  # data first: a data error shows before a long download
    model_location = cache_model(cfg)
    manifest = {
        "dataset": cfg.dataset.name,
        "splits": exported,
        "model": {"name_or_path": cfg.model.name_or_path, "source": cfg.model.source, "location": model_location},
        "offline_overrides": offline_overrides(exported),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    hub_env = "HF_HUB_OFFLINE=1 " if cfg.model.source == "hub" else ""
    print(
        f"Prepared {out}. Train offline with:\n  {hub_env}python grpo_train.py "
        + " ".join(manifest["offline_overrides"])
    )
    return manifest


def main() -> None:
    """Console script ``rlvr-prepare-data``."""
    from rlvr_vocab.cli import run_tool

    run_tool(prepare_data)


if __name__ == "__main__":
    main()
