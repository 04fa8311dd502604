"""Tests for envs.arithmetic: problem generation, splits and reward functions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from envs.arithmetic import (
    exact_match,
    exact_match_with_format,
    format_reward,
    make_problems,
    numeric_match,
    parse_number,
    write_splits,
)

_SAFE_EXPR = re.compile(r"[0-9+\-*()]+=")


def _eval_prompt(prompt: str) -> int:
    assert _SAFE_EXPR.fullmatch(prompt), prompt  # only digits/operators before eval
    return eval(prompt[:-1])


@pytest.mark.parametrize("kind", ["add", "mul", "multi", "mixed"])
def test_problems_correct_and_deterministic(kind: str) -> None:
    problems = make_problems(200, kind=kind, seed=11)
    assert problems == make_problems(200, kind=kind, seed=11)
    assert problems != make_problems(200, kind=kind, seed=12)
    for p in problems:
        assert set(p) == {"prompt", "answer", "kind"}
        assert p["prompt"].endswith("=")
        assert p["answer"] == str(_eval_prompt(p["prompt"]))
        assert int(p["answer"]) >= 0
        assert p["kind"] == kind or (kind == "mixed" and p["kind"] in {"add", "mul", "multi"})


def test_problem_shapes() -> None:
    for p in make_problems(100, "add", seed=0):
        a, b = p["prompt"][:-1].split("+")
        assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99
    for p in make_problems(100, "mul", seed=0):
        a, b = p["prompt"][:-1].split("*")
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 99
    multi = make_problems(200, "multi", seed=0)
    assert any("(" in p["prompt"] for p in multi)
    # Standard precedence is exercised: some flat prompt with * after +/-.
    assert any(re.fullmatch(r"\d[+-]\d\*\d=", p["prompt"]) for p in multi)
    assert {p["kind"] for p in make_problems(60, "mixed", seed=0)} == {"add", "mul", "multi"}
    for p in make_problems(50, "add", seed=0, max_operand=5):
        assert all(int(x) <= 5 for x in p["prompt"][:-1].split("+"))


def test_make_problems_errors() -> None:
    with pytest.raises(ValueError, match="unknown problem kind 'div'"):
        make_problems(3, kind="div")
    with pytest.raises(ValueError, match="max_operand"):
        make_problems(3, max_operand=0)
    with pytest.raises(ValueError, match="n must be"):
        make_problems(-1)
    assert make_problems(0) == []


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_splits_disjoint_and_deterministic(tmp_path: Path) -> None:
    train_path, test_path = write_splits(tmp_path / "d", 300, 100, kind="mixed", seed=5)
    assert train_path.name == "arith_train.jsonl" and test_path.name == "arith_test.jsonl"
    train, test = _read(train_path), _read(test_path)
    assert len(train) == 300 and len(test) == 100
    train_prompts, test_prompts = {p["prompt"] for p in train}, {p["prompt"] for p in test}
    assert len(train_prompts) == 300 and len(test_prompts) == 100
    assert train_prompts.isdisjoint(test_prompts)
    for p in train + test:
        assert p["answer"] == str(_eval_prompt(p["prompt"]))

    again = write_splits(tmp_path / "e", 300, 100, kind="mixed", seed=5)
    assert again[0].read_text() == train_path.read_text()
    assert again[1].read_text() == test_path.read_text()


def test_write_splits_too_small_space(tmp_path: Path) -> None:
    # add with max_operand=2 has only 9 distinct prompts.
    with pytest.raises(ValueError, match="only found 9 distinct 'add' problems"):
        write_splits(tmp_path, 8, 5, kind="add", max_operand=2)
    train_path, test_path = write_splits(tmp_path, 6, 3, kind="add", max_operand=2)
    assert len(_read(train_path)) + len(_read(test_path)) == 9


def test_parse_number() -> None:
    assert parse_number(" 19 apples") == 19.0
    assert parse_number("-5") == -5.0
    assert parse_number("x = 3.5!") == 3.5
    assert parse_number("answer: 12 or 13") == 12.0
    assert parse_number("none") is None
    assert parse_number("") is None


META = [{"answer": "19"}]


def _one(fn, completion: str, answer: str = "19", **kw) -> float:
    return fn(["12+7="], [completion], [{"answer": answer}], **kw)[0]


def test_exact_match() -> None:
    assert _one(exact_match, "19\n") == 1.0
    assert _one(exact_match, "19") == 1.0
    assert _one(exact_match, " 19 \nmore text") == 1.0
    assert _one(exact_match, "19<eos>garbage") == 1.0
    assert _one(exact_match, "18") == 0.0
    assert _one(exact_match, "19 apples") == 0.0
    assert _one(exact_match, "") == 0.0
    assert _one(exact_match, "\n19") == 0.0  # the first line is empty
    batch = exact_match(
        ["a", "b", "c"], ["1", "2", "3"], [{"answer": "1"}, {"answer": 2}, {"answer": "4"}]
    )
    assert batch == [1.0, 1.0, 0.0]


def test_numeric_match() -> None:
    assert _one(numeric_match, " 19 apples") == 1.0
    assert _one(numeric_match, "19.0") == 1.0
    assert _one(numeric_match, "it is 18") == 0.0
    assert _one(numeric_match, "no idea") == 0.0
    assert _one(numeric_match, "-3", answer="-3") == 1.0
    assert _one(numeric_match, "<eos>19") == 0.0  # text after EOS does not count
    with pytest.raises(ValueError, match=r"metadata\[0\]\['answer'\] is not a number"):
        _one(numeric_match, "1", answer="abc")


def test_format_reward() -> None:
    assert _one(format_reward, "19") == 1.0
    assert _one(format_reward, "19\n") == 1.0
    assert _one(format_reward, "18\n") == 1.0  # format only, not correctness
    assert _one(format_reward, "19<eos>") == 1.0
    assert _one(format_reward, "19 apples") == 0.0
    assert _one(format_reward, "19\nmore") == 0.0
    assert _one(format_reward, "19.5") == 0.0
    assert _one(format_reward, "") == 0.0


def test_exact_match_with_format() -> None:
    assert _one(exact_match_with_format, "19\n") == pytest.approx(1.0)
    assert _one(exact_match_with_format, "18") == pytest.approx(0.1)
    assert _one(exact_match_with_format, "19\nextra") == pytest.approx(0.9)
    assert _one(exact_match_with_format, "what") == 0.0
    assert _one(exact_match_with_format, "18", format_weight=0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="format_weight"):
        _one(exact_match_with_format, "19", format_weight=2.0)


def test_reward_input_errors() -> None:
    with pytest.raises(ValueError, match=r"metadata\[1\] has no 'answer'"):
        exact_match(["a", "b"], ["1", "2"], [{"answer": "1"}, {}])
    with pytest.raises(ValueError, match="2 completions but 1 metadata"):
        exact_match(["a", "b"], ["1", "2"], [{"answer": "1"}])
