"""Datasets -> conversational prompts + gold final answers.

Every dataset comes out with the same columns, whatever its source (hub, local file, generated):
    prompt   list of chat messages (system?, user); TRL applies the model's chat template
    problem  the problem text
    answer   the gold FINAL answer only ("18", "\\frac{4}{3}"), what the rewards compare against
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig

from rlvr_vocab.config import ConfigError
from rlvr_vocab.preflight import check_data_file
from rlvr_vocab.rewards.text import last_boxed

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# ------------------------------------------------------------------------------------- gold answers
def extract_gsm8k_answer(text: str) -> str | None:
    """The number after GSM8K's ``####`` marker, without thousands separators.

    Example:
        >>> extract_gsm8k_answer("She pays 16 - 3 = <<16-3=13>>13 dollars.\\n#### 1,300")
        '1300'
        >>> extract_gsm8k_answer("no marker") is None
        True
    """
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").rstrip(".")
    return answer or None


def extract_gold(value: Any, answer_format: str) -> str | None:
    """Gold final answer from a raw answer column, per ``dataset.answer_format``."""
    if value is None:
        return None
    text = str(value).strip()
    if answer_format == "gsm8k":
        return extract_gsm8k_answer(text)
    if answer_format == "boxed":
        return last_boxed(text) or None  # an empty box holds no gold answer
    return text or None


# ---------------------------------------------------------------------------------- generated arithmetic
_WORD_TEMPLATES = {
    "+": "{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?",
    "-": "{name} has {a} {item}s and gives away {b}. How many {item}s does {name} have left?",
    "*": "{name} buys {a} bags with {b} {item}s in each. How many {item}s does {name} buy?",
}
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana"]
_ITEMS = ["apple", "marble", "pencil", "sticker", "coin", "book"]


def _draw(rng: random.Random, gen: DictConfig) -> tuple[str, tuple[int, ...]]:
    """One (operation, operands) pair; subtraction keeps a non-negative result unless allowed."""
    op = rng.choice(list(gen.operations))
    count = gen.num_operands if gen.min_operands is None else rng.randint(gen.min_operands, gen.num_operands)
    operands = [rng.randint(gen.min_operand, gen.max_operand) for _ in range(count)]
    if op == "-" and not gen.allow_negative and operands[0] < sum(operands[1:]):
        if len(operands) == 2:
            operands.reverse()  # a - b with a >= b: the result stays in [0, max_operand]
        else:
            operands[0] = sum(operands[1:]) + rng.randint(0, gen.max_operand - gen.min_operand)
    return op, tuple(operands)


def _render(key: tuple[str, tuple[int, ...]], rng: random.Random, gen: DictConfig) -> dict[str, str]:
    op, operands = key
    expression = f" {op} ".join(str(x) for x in operands)
    value = eval(expression)  # noqa: S307 -- built from integers and one of + - * above
    if gen.word_problems and len(operands) == 2 and rng.random() < 0.5:
        problem = _WORD_TEMPLATES[op].format(
            name=rng.choice(_NAMES), item=rng.choice(_ITEMS), a=operands[0], b=operands[1]
        )
    else:
        problem = f"What is {expression}?"
    return {"problem": problem, "answer": str(value)}


def generate_arithmetic(gen: DictConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/held-out arithmetic problems; no held-out calculation appears in training.

    Example:
        >>> from omegaconf import OmegaConf
        >>> from rlvr_vocab.config import ArithmeticConfig
        >>> train, test = generate_arithmetic(OmegaConf.structured(ArithmeticConfig(num_train=5, num_eval=2)), 0)
        >>> len(train), len(test), set(train[0]) == {"problem", "answer"}
        (5, 2, True)
    """
    for op in gen.operations:
        if op not in _WORD_TEMPLATES:
            raise ConfigError(f"dataset.generator.operations has {op!r}: choose from + - *.")
    if gen.min_operand > gen.max_operand or gen.num_operands < 2:
        raise ConfigError("dataset.generator needs min_operand <= max_operand and num_operands >= 2.")
    low = gen.num_operands if gen.min_operands is None else gen.min_operands
    if not 2 <= low <= gen.num_operands:
        raise ConfigError("dataset.generator.min_operands must be between 2 and dataset.generator.num_operands.")
    k = gen.max_operand - gen.min_operand + 1

    def count_space(n: int, op: str) -> int:
        return k * (k + 1) // 2 if op == "-" and n == 2 and not gen.allow_negative else k**n

    space = sum(count_space(n, op) for n in range(low, gen.num_operands + 1) for op in set(gen.operations))
    if gen.num_eval > space // 2:
        raise ConfigError(
            f"dataset.generator.num_eval={gen.num_eval} leaves too few of the ~{space} distinct problems for "
            f"training: lower dataset.generator.num_eval (at most {space // 2}) or raise dataset.generator.max_operand."
        )
    rng = random.Random(seed)
    held_out: dict[tuple, dict] = {}
    for _ in range(1000 * (gen.num_eval + 1)):
        if len(held_out) == gen.num_eval:
            break
        key = _draw(rng, gen)
        if key not in held_out:
            held_out[key] = _render(key, rng, gen)
    else:
        raise ConfigError(f"dataset.generator.num_eval={gen.num_eval}: not enough distinct problems; lower it.")
    train = []
    while len(train) < gen.num_train:  # repeats are fine in training; held-out calculations are not
        key = _draw(rng, gen)
        if key not in held_out:
            train.append(_render(key, rng, gen))
    return train, list(held_out.values())


# ---------------------------------------------------------------------------------------------- loading
def _load_raw(ds_cfg: DictConfig, path: str | None, split: str | None):
    import datasets

    if path:
        key = "dataset.path" if path == ds_cfg.path else "dataset.eval_path"
        suffix = Path(path).suffix.lower()
        if suffix not in LOCAL_FORMATS:
            raise ConfigError(f"{key}={path!r}: use a .jsonl, .json, .parquet or .csv file.")
        if not Path(path).is_file():
            raise ConfigError(f"{key}={path!r} does not exist (relative paths start at the launch directory).")
        check_data_file(path, key)  # empty file, malformed jsonl line: named here, not as a loader traceback
        return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
    if not ds_cfg.hub_id:
        raise ConfigError(f"dataset {ds_cfg.name!r} has neither dataset.path nor dataset.hub_id set.")
    return datasets.load_dataset(ds_cfg.hub_id, ds_cfg.hub_config, split=split)


def build_prompt(problem: str, ds_cfg: DictConfig) -> list[dict[str, str]]:
    """The conversational prompt for one problem (TRL applies the chat template)."""
    messages = [{"role": "system", "content": ds_cfg.system_prompt}] if ds_cfg.system_prompt else []
    return messages + [{"role": "user", "content": ds_cfg.prompt_template.format(problem=problem)}]


def to_prompt_rows(raw, ds_cfg: DictConfig, what: str):
    """Check columns, extract gold answers, drop (and report) rows whose gold cannot be parsed."""
    import datasets

    for key in ("problem_key", "answer_key"):
        column = ds_cfg[key]
        if column not in raw.column_names:
            raise ConfigError(
                f"{what}: column {column!r} (dataset.{key}) not found; available columns: {raw.column_names}. "
                f"Set dataset.{key}=<column>."
            )
    from rlvr_vocab.rewards.accuracy import gold_is_parseable

    rows, unparseable = [], []
    for i, (problem, value) in enumerate(zip(raw[ds_cfg.problem_key], raw[ds_cfg.answer_key], strict=True)):
        gold = extract_gold(value, ds_cfg.answer_format)
        if gold is None or not gold_is_parseable(gold):
            unparseable.append(i)
            continue
        rows.append({"prompt": build_prompt(str(problem), ds_cfg), "problem": str(problem), "answer": gold})
    if unparseable:
        logger.warning(
            f"{what}: dropped {len(unparseable)}/{len(raw)} rows whose gold answer could not be parsed "
            f"(dataset.answer_format={ds_cfg.answer_format}); first row indices: {unparseable[:10]}"
        )
    if not rows:
        raise ConfigError(
            f"{what}: no row has a parseable gold answer; check dataset.answer_key and dataset.answer_format."
        )
    return datasets.Dataset.from_list(rows)


def _subsample(ds, n: int | None, seed: int, shuffle: bool):
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.select(range(min(n, len(ds)))) if n is not None else ds


def load_datasets(cfg: DictConfig):
    """(train, eval or None) as HF datasets with columns prompt / problem / answer."""
    import datasets

    ds_cfg = cfg.dataset
    if ds_cfg.name == "arithmetic" and not ds_cfg.path:
        data_seed = ds_cfg.generator.seed if ds_cfg.generator.seed is not None else cfg.seed
        train_rows, eval_rows = generate_arithmetic(ds_cfg.generator, data_seed)
        to_ds = lambda rows: datasets.Dataset.from_list(rows)  # noqa: E731
        raw_train, raw_eval = to_ds(train_rows), to_ds(eval_rows) if eval_rows else None
    else:
        raw_train = _load_raw(ds_cfg, ds_cfg.path, ds_cfg.split)
        raw_eval = None
        if ds_cfg.eval_path or (ds_cfg.eval_split and not ds_cfg.path):
            raw_eval = _load_raw(ds_cfg, ds_cfg.eval_path, ds_cfg.eval_split)
    train = _subsample(to_prompt_rows(raw_train, ds_cfg, "training data"), ds_cfg.max_train_samples, cfg.seed, True)
    evaluation = None
    if raw_eval is not None:
        evaluation = _subsample(to_prompt_rows(raw_eval, ds_cfg, "held-out data"), ds_cfg.max_eval_samples, 0, False)
    logger.info(f"Dataset {ds_cfg.name}: {len(train)} training rows, {len(evaluation or [])} held-out rows")
    return train, evaluation
