"""Tests for rlft_ray.rewards: loading reward specs and validated reward computation."""

from __future__ import annotations

import functools
import math

import pytest

import envs.arithmetic as arithmetic
from rlft_ray import rewards
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


# --------------------------------------------------------------------------- built-in verifiers


def _score(fn, completions: list[str], answers: list) -> list[float]:
    """``fn`` through :func:`compute_rewards`, each completion against its answer."""
    meta = [{"answer": a} for a in answers]
    return compute_rewards(fn, [f"q{i}" for i in range(len(completions))], completions, meta)


def test_built_ins_load_by_name() -> None:
    for name in ("final_number", "exact_match", "boxed", "answer_format"):
        assert load_reward_fn(f"rlft_ray.rewards:{name}") is getattr(rewards, name)
    assert load_reward_fn("rlft_ray.rewards.verifiers:final_number") is rewards.final_number


def test_a_misspelt_built_in_suggests_the_name() -> None:
    with pytest.raises(
        ValueError, match=r"no attribute 'final_numbr'.*did you mean 'final_number'"
    ):
        load_reward_fn("rlft_ray.rewards:final_numbr")


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("73", "73", 1.0),
        ("32 + 41 = 73", "73", 1.0),  # the chat answer exact match scores 0
        ("The answer is 73.", "73", 1.0),
        ("**73**", "73", 1.0),
        ("The answer is **73**.\n", "73", 1.0),
        ("$73$", "73", 1.0),
        ("73.", "73", 1.0),
        ("73.0", "73", 1.0),
        ("73.00", 73, 1.0),  # an integer answer column
        ("73", 73.0, 1.0),  # a float answer column
        ("73.5", "73", 0.0),
        ("1,234", "1234", 1.0),
        ("It costs $1,234,567.", "1234567", 1.0),
        ("1234", "1,234", 1.0),  # separators in the answer too
        ("12,34", "34", 1.0),  # not a thousands group: two numbers, 12 and 34
        ("1,2345", "2345", 1.0),  # a group that runs on is no group either
        ("-5", "-5", 1.0),
        ("\u22125", "-5", 1.0),  # the minus sign
        ("+5", "5", 1.0),
        ("3 - 8 = -5", "-5", 1.0),
        ("10-3", "3", 1.0),  # a '-' glued to a digit is the operator, not a sign
        ("10-3", "-3", 0.0),
        ("-0", "0", 1.0),
        ("0.5", ".5", 1.0),
        ("It is .5", "0.5", 1.0),
        ("73 apples", "73", 1.0),
        ("73, no wait, 72", "73", 0.0),  # the last number decides
        ("Step 1: 30 + 40 = 70. Step 2: 70 + 3 = 73", "73", 1.0),
        ("73<|im_end|>and then 5", "73", 1.0),  # text after an end-of-turn marker is ignored
        ("no number here", "73", 0.0),
        ("", "0", 0.0),
        ("12345678901234567", "12345678901234568", 0.0),  # exact, not float, comparison
        ("12345678901234567", "12345678901234567", 1.0),
    ],
)
def test_final_number(completion: str, answer: object, reward: float) -> None:
    assert _score(rewards.final_number, [completion], [answer]) == [reward]


def test_final_number_batch_and_ground_truth() -> None:
    completions = ["32 + 41 = 73", "I get 10", "nothing", "-2.50"]
    meta = [{"answer": "73"}, {"answer": "11"}, {"answer": "0"}, {"ground_truth": "-2.5"}]
    assert rewards.final_number(["a", "b", "c", "d"], completions, meta) == [1.0, 0.0, 0.0, 1.0]
    # an answer of None falls back to ground_truth, as prompt files do
    assert rewards.final_number(["a"], ["7"], [{"answer": None, "ground_truth": 7}]) == [1.0]


@pytest.mark.parametrize("answer", ["seventy-three", "3/4", "73 apples", "- 5", True, float("nan")])
def test_final_number_refuses_an_answer_that_is_no_number(answer: object) -> None:
    with pytest.raises(RewardError, match=r"final_number raised .*is not a number.*sample 0"):
        _score(rewards.final_number, ["73"], [answer])


@pytest.mark.parametrize("fn", ["final_number", "exact_match", "boxed"])
def test_a_missing_answer_names_the_key(fn: str) -> None:
    with pytest.raises(RewardError) as info:
        compute_rewards(
            getattr(rewards, fn), ["1+1=", "2+2="], ["2", "4"], [{"answer": "2"}, {"kind": "add"}]
        )
    msg = str(info.value)
    assert f"{fn} raised RewardError: no reference answer: metadata has no 'answer' key" in msg
    assert "'ground_truth'" in msg and "['kind']" in msg and "sample 1 (prompt '2+2=')" in msg
    for blank in ({"answer": None}, {"answer": "  ", "ground_truth": None}):  # as prompt files
        with pytest.raises(RewardError, match="no reference answer"):
            getattr(rewards, fn)(["1+1="], ["2"], [blank])
    with pytest.raises(RewardError, match="metadata must be a dict with an 'answer', got str"):
        getattr(rewards, fn)(["1+1="], ["2"], ["2"])
    with pytest.raises(ValueError, match="got 2 completions but 1 metadata entries"):
        getattr(rewards, fn)(["a", "b"], ["2", "4"], [{"answer": "2"}])


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("73", "73", 1.0),
        (" 73\n", "73", 1.0),
        ("73.", "73", 1.0),
        ("73 .", "73", 1.0),
        ("73..", "73", 0.0),  # one trailing period only
        ("73", 73, 1.0),
        ("Paris", "Paris.", 1.0),  # the answer is normalised alike
        ("paris", "Paris", 0.0),  # case counts
        ("73.0", "73", 0.0),  # text, not numbers
        ("32 + 41 = 73", "73", 0.0),
        ("73\n74", "73", 0.0),  # a second line is part of the completion
        ("73<|im_end|>", "73", 1.0),
        ("", "73", 0.0),
        ("the end", "the end", 1.0),
    ],
)
def test_exact_match(completion: str, answer: object, reward: float) -> None:
    assert _score(rewards.exact_match, [completion], [answer]) == [reward]


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        (r"\boxed{73}", "73", 1.0),
        (r"So 32 + 41 = 73, and the answer is $\boxed{73}$.", "73", 1.0),
        (r"\boxed{ 73 }", "73", 1.0),
        (r"\boxed{73.0}", "73", 1.0),  # both numbers: compared as numbers
        (r"\boxed{73.}", "73", 1.0),
        (r"\boxed{1,234}", "1234", 1.0),
        (r"\boxed {73}", "73", 1.0),
        (r"\boxed{72} wait, no: \boxed{73}", "73", 1.0),  # the last box decides
        (r"\boxed{73} wait, no: \boxed{72}", "73", 0.0),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0),  # nested braces
        (r"\boxed{\frac{1}{2}}", "0.5", 0.0),  # LaTeX is text
        (r"\boxed{{a}{b}}", "{a}{b}", 1.0),
        (r"\boxed{x^{2}} + 1", "x^{2}", 1.0),
        (r"\boxed{Paris}", "Paris", 1.0),
        (r"\boxed{paris}", "Paris", 0.0),
        (r"\boxed{73 apples}", "73", 0.0),
        ("73", "73", 0.0),  # no box
        (r"\boxed{73", "73", 0.0),  # never closed
        (r"\boxed{\frac{1}{2}", r"\frac{1}{2}", 0.0),  # never closed (inner ones are)
        (r"\boxed{}", "73", 0.0),  # an empty box
        (r"\boxed{73}<|im_end|>\boxed{5}", "73", 1.0),
    ],
)
def test_boxed(completion: str, answer: str, reward: float) -> None:
    assert _score(rewards.boxed, [completion], [answer]) == [reward]


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("73", 1.0),
        ("73.", 1.0),
        (" 73 \n", 1.0),
        ("-1,234.5.\n", 1.0),
        ("+0.25", 1.0),
        (".5", 1.0),
        ("73<|im_end|>", 1.0),
        ("73..", 0.0),
        ("**73**", 0.0),
        ("73 apples", 0.0),
        ("The answer is 73.", 0.0),
        ("32 + 41 = 73", 0.0),
        ("73\n74", 0.0),
        ("1,2345", 0.0),
        ("", 0.0),
        ("   ", 0.0),
    ],
)
def test_answer_format(completion: str, reward: float) -> None:
    # the form only: the metadata is not read, a wrong number is well formed
    assert rewards.answer_format(["q"], [completion], [{}]) == [reward]
    assert _score(rewards.answer_format, [completion], ["999"]) == [reward]


def test_number_helpers() -> None:
    assert rewards.parse_number(" 1,234. ") == 1234
    assert rewards.parse_number("-0.50") == rewards.parse_number("-.5")
    assert rewards.parse_number("73 apples") is None and rewards.parse_number("3/4") is None
    assert rewards.last_number("32 + 41 = 73.") == 73
    assert rewards.last_number("none") is None
    assert rewards.last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert rewards.last_boxed("no box") is None
    assert rewards.reference_answer({"answer": 0, "ground_truth": 5}) == 0  # 0 is an answer
