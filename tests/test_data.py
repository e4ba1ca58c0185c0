"""Prompts and gold answers: real GSM8K files, generated arithmetic, bad-data errors."""

from __future__ import annotations

import json

import pytest

from rlvr_vocab.config import ConfigError
from rlvr_vocab.data import extract_gold, generate_arithmetic, load_datasets


def test_gsm8k_gold_extraction_on_the_real_files(gsm8k_dir, make_cfg):
    cfg = make_cfg(
        "dataset=gsm8k",
        f"dataset.path={gsm8k_dir / 'train.jsonl'}",
        f"dataset.eval_path={gsm8k_dir / 'test.jsonl'}",
        "dataset.max_train_samples=200",
    )
    train, test = load_datasets(cfg)
    assert len(train) == 200 and len(test) == 1319  # every test row has a parseable gold answer
    raw = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()]
    by_question = {r["question"]: r["answer"] for r in raw}
    for row in test.select(range(50)):
        gold = by_question[row["problem"]].rsplit("####", 1)[1].strip().replace(",", "")
        assert row["answer"] == gold
        assert row["prompt"][-1]["role"] == "user" and row["problem"] in row["prompt"][-1]["content"]
        assert "\\boxed{}" in row["prompt"][-1]["content"]
    # thousands separators are removed
    with_commas = [r for r in raw if "," in r["answer"].rsplit("####", 1)[1]]
    assert with_commas and "," not in extract_gold(with_commas[0]["answer"], "gsm8k")


def test_system_prompt_and_template_reach_the_prompt(make_cfg):
    cfg = make_cfg(
        "dataset=arithmetic", "dataset.system_prompt=Think first.", "dataset.prompt_template='Q: {problem}'"
    )
    train, _ = load_datasets(cfg)
    assert train[0]["prompt"][0] == {"role": "system", "content": "Think first."}
    assert train[0]["prompt"][1]["content"] == "Q: " + train[0]["problem"]


def test_arithmetic_is_seeded_correct_and_disjoint(make_cfg):
    cfg = make_cfg("dataset=arithmetic", "dataset.generator.operations=[+,-,*]", "dataset.generator.max_operand=99")
    gen = cfg.dataset.generator
    train, held_out = generate_arithmetic(gen, seed=1)
    again, _ = generate_arithmetic(gen, seed=1)
    other, _ = generate_arithmetic(gen, seed=2)
    assert train == again and train != other
    assert not {r["problem"] for r in held_out} & {r["problem"] for r in train}
    for row in train[:200]:
        expression = row["problem"].removeprefix("What is ").removesuffix("?")
        assert int(row["answer"]) == eval(expression) >= 0  # noqa: S307 -- our own generated text


def test_missing_column_names_available_columns_and_key(tmp_path, make_cfg):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    cfg = make_cfg("dataset=deepscaler", f"dataset.path={path}")
    with pytest.raises(ConfigError, match=r"'problem'.*dataset.problem_key.*\['question', 'solution'\]"):
        load_datasets(cfg)


def test_unparseable_gold_rows_are_dropped_and_counted(tmp_path, make_cfg, caplog):
    path = tmp_path / "data.jsonl"
    rows = [{"question": f"q{i}", "answer": f"work\n#### {i}"} for i in range(5)]
    rows += [{"question": "bad1", "answer": "no marker"}, {"question": "bad2", "answer": "#### "}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    messages = []
    from loguru import logger

    handle = logger.add(messages.append, level="WARNING")
    try:
        train, _ = load_datasets(make_cfg("dataset=gsm8k", f"dataset.path={path}"))
    finally:
        logger.remove(handle)
    assert sorted(train["answer"]) == ["0", "1", "2", "3", "4"]
    assert any("dropped 2/7 rows" in str(m) for m in messages)


def test_missing_local_file_is_a_clear_error(make_cfg):
    with pytest.raises(ConfigError, match="dataset.path"):
        load_datasets(make_cfg("dataset=gsm8k", "dataset.path=/nonexistent/train.jsonl"))


# ------------------------------------------------------------------------- bad files: named before any load
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", r"dataset.path='.*empty.jsonl' is empty \(0 bytes\)"),
        ("blank.jsonl", "\n  \n", "has only blank lines"),
        ("torn.jsonl", '{"question": "1+1", "answer": "2"}\n{"question": "2+', "line 2 is not valid JSON"),
        ("bad.jsonl", '{"question": "q", "answer": "1"}\n\n[1, 2]\n', "line 3 is a JSON list, not an object"),
        ("empty.json", "[]", "holds an empty JSON list"),
        ("empty.csv", "", "is empty"),
    ],
)
def test_bad_local_files_name_the_file_and_line(make_cfg, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    cfg = make_cfg("dataset=gsm8k", f"dataset.path={path}", "dataset.answer_format=plain")
    with pytest.raises(ConfigError, match=message):
        load_datasets(cfg)


def test_a_bad_eval_file_names_dataset_eval_path(make_cfg, tmp_path):
    good, bad = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    good.write_text('{"question": "1+1", "answer": "2"}\n')
    bad.write_text('{"question": "1+1", "answer": "2"}\n{oops}\n')
    cfg = make_cfg("dataset=gsm8k", f"dataset.path={good}", f"dataset.eval_path={bad}", "dataset.answer_format=plain")
    with pytest.raises(ConfigError, match=r"dataset.eval_path='.*test.jsonl': line 2 is not valid JSON"):
        load_datasets(cfg)
