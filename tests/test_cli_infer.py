"""rlvr-infer on the tiny model: one question, a jsonl batch, an interactive session, and the no-input error."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from conftest import CACHE_DIR, cached_config

from rlvr_vocab.cli.infer import infer, read_questions
from rlvr_vocab.config import ConfigError

GEN = ("eval.max_new_tokens=8", "eval.batch_size=4")


def _cfg(*overrides: str):
    return cached_config("model=tiny", "dataset=arithmetic", *GEN, *overrides)


def test_one_question_prints_completion_and_answer(capsys):
    (result,) = infer(_cfg("question=What is 2 + 3?"))
    assert result["question"] == "What is 2 + 3?" and isinstance(result["completion"], str)
    assert 1 <= result["num_tokens"] <= 8
    printed = capsys.readouterr().out
    assert result["completion"] in printed and "answer: " in printed


def test_batch_file_to_jsonl_with_samples(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "What is 1 + 1?", "answer": "2", "id": 7}\n\n"What is 3 + 4?"\n')
    out = tmp_path / "a.jsonl"
    infer(_cfg(f"input_file={questions}", f"output_file={out}", "eval.num_samples=3"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["What is 1 + 1?", "What is 3 + 4?"]
    assert rows[0]["id"] == 7 and rows[0]["gold"] == "2"
    for row in rows:
        assert {"completion", "answer", "completions", "answers"} <= set(row)
        assert len(row["completions"]) == 3 and row["completion"] in row["completions"]


def test_interactive_session_reads_until_exit(capsys):
    stream = io.StringIO("What is 2 + 2?\n\nWhat is 5 + 1?\nexit\nnever asked\n")
    answered = infer(_cfg(), stream=stream)
    assert [r["question"] for r in answered] == ["What is 2 + 2?", "What is 5 + 1?"]
    assert capsys.readouterr().out.count("answer: ") == 2


def test_bad_input_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no question key"}\n')
    with pytest.raises(ConfigError, match="line 1 has no 'question'"):
        read_questions(bad)
    with pytest.raises(ConfigError, match="not both"):
        infer(_cfg("question=hi", f"input_file={bad}"))


def test_no_question_and_no_terminal_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rlvr_vocab.cli.infer", "model=tiny", f"paths.cache_dir={CACHE_DIR}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "question=" in done.stderr and "input_file=" in done.stderr
    ok = subprocess.run(
        [*cmd, "question=What is 1 + 2?", "eval.max_new_tokens=4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "answer: " in ok.stdout
