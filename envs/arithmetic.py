"""Arithmetic text tasks with verifiable rewards.

Problems are prompts like ``"12+7="`` with an integer answer (``"19"``). Reward functions share
the signature ``fn(prompts, completions, metadata) -> list[float]`` where ``metadata[i]`` is the
problem dict (at least ``{"answer": ...}``), so they can be loaded with
``rlft_ray.rewards.load_reward_fn("envs.arithmetic:exact_match")``. Pure Python, no torch.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rlft_ray.rewards.verifiers import cut_at_eos

KINDS: tuple[str, ...] = ("add", "mul", "multi", "mixed")
_BASE_KINDS: tuple[str, ...] = ("add", "mul", "multi")
# Default operand bound per kind: 2-digit addition, 1-digit x (1-or-2)-digit, single-digit chains.
DEFAULT_MAX_OPERAND: dict[str, int] = {"add": 99, "mul": 99, "multi": 9}

_NUMBER_RE = re.compile(r"[-+]?\d+(?:\.\d+)?")
_INTEGER_ONLY_RE = re.compile(r"[ \t]*-?\d+\s*")

Problem = dict[str, Any]


# --------------------------------------------------------------------------- problem generation


def _gen_add(rng: random.Random, max_operand: int) -> tuple[str, int]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return f"{a}+{b}=", a + b


def _gen_mul(rng: random.Random, max_operand: int) -> tuple[str, int]:
    # First factor is a single digit (capped by max_operand), second up to max_operand.
    a, b = rng.randint(0, min(9, max_operand)), rng.randint(0, max_operand)
    return f"{a}*{b}=", a * b


def _apply(op: str, x: int, y: int) -> int:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    return x * y


def _gen_multi(rng: random.Random, max_operand: int) -> tuple[str, int]:
    # Three operands, two operators; either standard precedence or explicit parentheses.
    # Resample negative results so every answer is a plain non-negative integer.
    while True:
        a, b, c = (rng.randint(0, max_operand) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        layout = rng.choice(("flat", "left", "right"))
        if layout == "left":
            expr, value = f"({a}{op1}{b}){op2}{c}", _apply(op2, _apply(op1, a, b), c)
        elif layout == "right":
            expr, value = f"{a}{op1}({b}{op2}{c})", _apply(op1, a, _apply(op2, b, c))
        elif op2 == "*" and op1 != "*":
            expr, value = f"{a}{op1}{b}{op2}{c}", _apply(op1, a, b * c)  # * binds tighter
        else:
            expr, value = f"{a}{op1}{b}{op2}{c}", _apply(op2, _apply(op1, a, b), c)
        if value >= 0:
            return f"{expr}=", value


_GENERATORS = {"add": _gen_add, "mul": _gen_mul, "multi": _gen_multi}


def _check_kind_and_bound(kind: str, max_operand: int | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown problem kind {kind!r}; expected one of {list(KINDS)}")
    if max_operand is not None and (
        isinstance(max_operand, bool) or not isinstance(max_operand, int) or max_operand < 1
    ):
        raise ValueError(f"max_operand must be a positive int or None, got {max_operand!r}")


def _iter_problems(rng: random.Random, kind: str, max_operand: int | None) -> Iterator[Problem]:
    """Yield an endless stream of problems of ``kind`` drawn from ``rng``."""
    while True:
        sub_kind = rng.choice(_BASE_KINDS) if kind == "mixed" else kind
        bound = max_operand if max_operand is not None else DEFAULT_MAX_OPERAND[sub_kind]
        prompt, answer = _GENERATORS[sub_kind](rng, bound)
        yield {"prompt": prompt, "answer": str(answer), "kind": sub_kind}


def make_problems(
    n: int, kind: str = "add", seed: int = 0, max_operand: int | None = None
) -> list[Problem]:
    """Generate ``n`` arithmetic problems deterministically from ``seed``.

    Args:
        n: Number of problems (duplicates are possible; see :func:`write_splits` for unique ones).
        kind: ``"add"`` (``a+b``), ``"mul"`` (1-digit x up-to-``max_operand``), ``"multi"``
            (three operands with ``+ - *``, standard precedence or parentheses, non-negative
            result) or ``"mixed"`` (each problem picks one of the three uniformly).
        seed: Seed of the private ``random.Random``; the global RNG is not touched.
        max_operand: Largest operand; ``None`` uses :data:`DEFAULT_MAX_OPERAND` per kind.

    Returns:
        Dicts ``{"prompt": "12+7=", "answer": "19", "kind": "add"}``; for ``"mixed"`` the
        ``kind`` field holds the concrete sub-kind.

    Raises:
        ValueError: Negative ``n``, unknown ``kind`` or invalid ``max_operand``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_kind_and_bound(kind, max_operand)
    stream = _iter_problems(random.Random(seed), kind, max_operand)
    return [next(stream) for _ in range(n)]


def _write_jsonl(path: Path, rows: Sequence[Problem]) -> None:
    # Write to a temp file then rename, so readers never see a truncated split.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def write_splits(
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_test: int,
    kind: str = "add",
    seed: int = 0,
    max_operand: int | None = None,
    chat: bool = False,
) -> tuple[Path, Path]:
    """Write disjoint train/test splits as ``arith_train.jsonl`` and ``arith_test.jsonl``
    (``chat``: ``chat_arith_*.jsonl``, the same problems as questions, :func:`as_question`).

    Problems are drawn until ``n_train + n_test`` distinct prompts are found, then split, so no
    prompt appears twice in a split or in both splits.

    Args:
        out_dir: Directory for the two files (created if missing).
        n_train: Number of training problems.
        n_test: Number of test problems.
        kind: Problem kind (see :func:`make_problems`).
        seed: Seed for generation; same arguments give identical files.
        max_operand: Operand bound (see :func:`make_problems`).
        chat: Write the problems as questions for instruct models.

    Returns:
        ``(train_path, test_path)``.

    Raises:
        ValueError: Bad sizes/kind, or the problem space is too small for the requested sizes.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    _check_kind_and_bound(kind, max_operand)
    needed = n_train + n_test
    stream = _iter_problems(random.Random(seed), kind, max_operand)
    seen: dict[str, Problem] = {}
    misses, max_misses = 0, 1000 + 20 * needed
    while len(seen) < needed:
        problem = next(stream)
        if problem["prompt"] in seen:
            misses += 1  # consecutive duplicates mean the problem space is (nearly) exhausted
            if misses > max_misses:
                raise ValueError(
                    f"only found {len(seen)} distinct {kind!r} problems (max_operand={max_operand}), "
                    f"need {needed}; lower n_train/n_test or raise max_operand"
                )
            continue
        misses = 0
        seen[problem["prompt"]] = problem
    problems = list(seen.values())
    train, test = problems[:n_train], problems[n_train:]
    if not {p["prompt"] for p in train}.isdisjoint(p["prompt"] for p in test):
        raise AssertionError("internal error: train and test splits share a prompt")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "chat_arith" if chat else "arith"
    if chat:
        train, test = [as_question(p) for p in train], [as_question(p) for p in test]
    train_path, test_path = out / f"{stem}_train.jsonl", out / f"{stem}_test.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(test_path, test)
    return train_path, test_path


def as_question(problem: Problem) -> Problem:
    """The problem as an instruct model's user message: ``"49+97="`` -> ``"What is 49 + 97?"``
    (the answer unchanged; score chat answers with ``rlft_ray.rewards:final_number``)."""
    expr = re.sub(r"\s*([+\-*])\s*", r" \1 ", problem["prompt"].rstrip("= ")).strip()
    return {**problem, "prompt": f"What is {expr}?"}


# --------------------------------------------------------------------------------- rewards


def parse_number(text: str) -> float | None:
    """Return the first number (optionally signed, optionally decimal) in ``text``, or ``None``.

    Example: ``parse_number(" 19 apples") == 19.0``; ``parse_number("no") is None``.
    """
    match = _NUMBER_RE.search(text)
    return float(match.group()) if match else None


def _first_answer(completion: str) -> str:
    """The completion cut at the first EOS marker and first newline, stripped."""
    return cut_at_eos(completion).split("\n", 1)[0].strip()


def _answers(completions: Sequence[str], metadata: Sequence[dict[str, Any]]) -> list[str]:
    """Extract ``metadata[i]["answer"]`` as stripped strings, checking lengths."""
    if len(completions) != len(metadata):
        raise ValueError(f"got {len(completions)} completions but {len(metadata)} metadata entries")
    answers = []
    for i, meta in enumerate(metadata):
        if not isinstance(meta, dict) or "answer" not in meta:
            raise ValueError(f"metadata[{i}] has no 'answer' key: {meta!r}")
        answers.append(str(meta["answer"]).strip())
    return answers


def exact_match(
    prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]
) -> list[float]:
    """1.0 where the completion, cut at the first newline/EOS and stripped, equals the answer.

    Args:
        prompts: The prompts (unused; part of the reward signature).
        completions: Generated continuations of the prompts.
        metadata: Per-sample dicts with an ``"answer"`` key.

    Returns:
        One reward in {0.0, 1.0} per completion.
    """
    answers = _answers(completions, metadata)
    return [float(_first_answer(c) == a) for c, a in zip(completions, answers)]


def numeric_match(
    prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]
) -> list[float]:
    """1.0 where the first number in the completion numerically equals the answer.

    More lenient than :func:`exact_match`: ``" 19 apples"`` and ``"19.0"`` both match ``"19"``.

    Args:
        prompts: The prompts (unused).
        completions: Generated continuations.
        metadata: Per-sample dicts with an ``"answer"`` key (must parse as a number).

    Returns:
        One reward in {0.0, 1.0} per completion.

    Raises:
        ValueError: An answer is not a number.
    """
    answers = _answers(completions, metadata)
    rewards = []
    for i, (completion, answer) in enumerate(zip(completions, answers)):
        target = parse_number(answer)
        if target is None:
            raise ValueError(f"metadata[{i}]['answer'] is not a number: {answer!r}")
        got = parse_number(cut_at_eos(completion))
        rewards.append(float(got is not None and math.isclose(got, target, abs_tol=1e-9)))
    return rewards


def format_reward(
    prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]
) -> list[float]:
    """1.0 where the completion is just an integer, optionally followed by a newline.

    Text after an EOS marker is ignored; surrounding blanks are tolerated, anything else
    (words, a second line of text, decimals) scores 0.0.

    Args:
        prompts: The prompts (unused).
        completions: Generated continuations.
        metadata: Per-sample dicts (unused, but must match ``completions`` in length).

    Returns:
        One reward in {0.0, 1.0} per completion.
    """
    if len(completions) != len(metadata):
        raise ValueError(f"got {len(completions)} completions but {len(metadata)} metadata entries")
    return [float(_INTEGER_ONLY_RE.fullmatch(cut_at_eos(c)) is not None) for c in completions]


def exact_match_with_format(
    prompts: list[str],
    completions: list[str],
    metadata: list[dict[str, Any]],
    format_weight: float = 0.1,
) -> list[float]:
    """Blend of correctness and format: ``(1 - w) * exact_match + w * format_reward``.

    Rewards stay in [0, 1]: 1.0 for a correct, clean answer, ``w`` for a well-formed wrong one.

    Args:
        prompts: The prompts.
        completions: Generated continuations.
        metadata: Per-sample dicts with an ``"answer"`` key.
        format_weight: Weight ``w`` in [0, 1] of the format term.

    Returns:
        One reward per completion.

    Raises:
        ValueError: ``format_weight`` outside [0, 1].
    """
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    exact = exact_match(prompts, completions, metadata)
    fmt = format_reward(prompts, completions, metadata)
    return [(1.0 - format_weight) * e + format_weight * f for e, f in zip(exact, fmt)]


def digit_fraction(
    prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]
) -> list[float]:
    """Fraction of the completion's characters (before any EOS marker) that are digits.

    A dense shaping reward: a randomly initialised model almost never produces an exact
    answer, but it can quickly learn to answer with digits. Empty completions score 0.0.

    Args:
        prompts: The prompts (unused).
        completions: Generated continuations.
        metadata: Per-sample dicts (unused, but must match ``completions`` in length).

    Returns:
        One reward in [0, 1] per completion.
    """
    if len(completions) != len(metadata):
        raise ValueError(f"got {len(completions)} completions but {len(metadata)} metadata entries")
    out = []
    for completion in completions:
        text = cut_at_eos(completion)
        out.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return out
