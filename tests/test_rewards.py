"""Tests for rlft_ray.rewards: loading reward specs and validated reward computation."""

from __future__ import annotations

import functools
import math

import pytest

import envs.arithmetic as arithmetic
from rlft_ray.rewards import RewardError, compute_rewards, load_reward_fn

PROMPTS = ["1+1=", "2+2=", "3+3="]
COMPLETIONS = ["2", "5", "6\n"]
META = [{"answer": "2"}, {"answer": "4"}, {"answer": "6"}]


def test_load_reward_fn_and_compute() -> None:
    fn = load_reward_fn("envs.arithmetic:exact_match")
    assert fn is arithmetic.exact_match
    assert compute_rewards(fn, PROMPTS, COMPLETIONS, META) == [1.0, 0.0, 1.0]
    assert load_reward_fn(" envs.arithmetic:format_reward ") is arithmetic.format_reward
    assert load_reward_fn(arithmetic.numeric_match) is arithmetic.numeric_match
    # Dotted attribute paths work too.
    assert load_reward_fn("math:pi.__class__") is float


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("envs.arithmetic.exact_match", "expected exactly one ':'"),
        ("envs.arithmetic:exact_match:x", "expected exactly one ':'"),
        (":exact_match", "invalid module path ''"),
        ("envs.arithmetic:", "invalid function name ''"),
        ("envs..arithmetic:f", "invalid module path 'envs..arithmetic'"),
        ("envs.arithmetic:1bad", "invalid function name '1bad'"),
        ("envs.no_such_module:f", "cannot import reward module 'envs.no_such_module'"),
        ("envs.arithmetic:no_such_fn", "has no attribute 'no_such_fn'"),
        ("envs.arithmetic:KINDS", "names a tuple, not a callable"),
    ],
)
def test_load_reward_fn_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_reward_fn(spec)


def test_load_reward_fn_non_string() -> None:
    with pytest.raises(ValueError, match="got int"):
        load_reward_fn(3)  # type: ignore[arg-type]


def _raises_on_second(prompts, completions, metadata):
    out = []
    for p in prompts:
        if p == "2+2=":
            raise KeyError("boom")
        out.append(1.0)
    return out


def test_exception_names_sample() -> None:
    with pytest.raises(RewardError) as info:
        compute_rewards(_raises_on_second, PROMPTS, COMPLETIONS, META)
    msg = str(info.value)
    assert "_raises_on_second" in msg and "KeyError" in msg and "boom" in msg
    assert "sample 1" in msg and "'2+2='" in msg
    assert isinstance(info.value.__cause__, KeyError)


def test_exception_batch_only() -> None:
    def fails_on_batches(prompts, completions, metadata):
        if len(prompts) > 1:
            raise ValueError("batch-level failure")
        return [1.0]

    with pytest.raises(RewardError, match=r"batch-level failure.*no single sample reproduces"):
        compute_rewards(fails_on_batches, PROMPTS, COMPLETIONS, META)

    def fails_differently(prompts, completions, metadata):
        if len(prompts) > 1:
            raise ValueError("batch-level failure")
        raise RuntimeError("single failure")

    with pytest.raises(
        RewardError,
        match=r"ValueError: batch-level failure; re-run alone, sample 0 .*RuntimeError: single",
    ):
        compute_rewards(fails_differently, PROMPTS, COMPLETIONS, META)


def test_exception_single_sample_and_partial_name() -> None:
    fn = functools.partial(_raises_on_second)
    with pytest.raises(RewardError, match=r"_raises_on_second raised KeyError.*sample 0"):
        compute_rewards(fn, ["2+2="], ["4"], [{"answer": "4"}])


def test_nan_and_inf_name_sample() -> None:
    with pytest.raises(RewardError, match=r"returned nan for sample 2 \(prompt '3\+3='\)"):
        compute_rewards(lambda p, c, m: [1.0, 0.0, math.nan], PROMPTS, COMPLETIONS, META)
    with pytest.raises(RewardError, match=r"returned inf for sample 0"):
        compute_rewards(lambda p, c, m: [math.inf, 0.0, 0.0], PROMPTS, COMPLETIONS, META)


def test_non_number_names_sample() -> None:
    with pytest.raises(RewardError, match=r"non-number for sample 1 \(prompt '2\+2='\): '1'"):
        compute_rewards(lambda p, c, m: [1.0, "1", 0.0], PROMPTS, COMPLETIONS, META)
    with pytest.raises(RewardError, match=r"non-number for sample 0.*None"):
        compute_rewards(lambda p, c, m: [None, 1.0, 0.0], PROMPTS, COMPLETIONS, META)
    with pytest.raises(RewardError, match="must return a list of 3 floats, got float"):
        compute_rewards(lambda p, c, m: 1.0, PROMPTS, COMPLETIONS, META)


def test_wrong_length() -> None:
    with pytest.raises(RewardError, match=r"expected 3 \(one per completion\), got 2"):
        compute_rewards(lambda p, c, m: [1.0, 0.0], PROMPTS, COMPLETIONS, META)


def test_accepts_ints_bools_and_tuples() -> None:
    assert compute_rewards(lambda p, c, m: (1, True, 0.5), PROMPTS, COMPLETIONS, META) == [
        1.0,
        1.0,
        0.5,
    ]
    assert all(
        isinstance(r, float)
        for r in compute_rewards(lambda p, c, m: [1, 0, 1], PROMPTS, COMPLETIONS, META)
    )


def test_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="equal lengths, got 3, 2, 3"):
        compute_rewards(arithmetic.exact_match, PROMPTS, COMPLETIONS[:2], META)
