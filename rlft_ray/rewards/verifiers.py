"""Built-in verifier rewards: a completion checked against the prompt's reference answer.

Each function has the reward signature
``fn(prompts, completions, metadata) -> list[float]`` and is named in configs through the
package, e.g. ``lm.reward_fn: rlft_ray.rewards:final_number``. The reference answer is
``metadata[i]["answer"]``, or ``metadata[i]["ground_truth"]`` when there is no answer (prompt
files already copy ``ground_truth`` to ``answer``; the fallback serves direct callers). Text
from the first end-of-turn marker on (``<|im_end|>``, ``</s>``, ...) is ignored, in case a
completion was decoded with its special tokens.

* :func:`final_number`: the last number in the completion equals the answer numerically
  (chat answers such as ``"32 + 41 = 73"`` or ``"The answer is **73**."``).
* :func:`exact_match`: the whole completion equals the answer, up to surrounding whitespace
  and a trailing period.
* :func:`boxed`: the content of the last ``\\boxed{...}`` equals the answer.
* :func:`answer_format`: the completion is a single number and nothing else (no answer
  needed), to add to a correctness reward in a reward function of your own.

Numbers are read as exact decimals: an optional sign (``-``, ``+`` or the minus sign
U+2212), digits with optional thousands separators (``1,234``), an optional fraction
(``73.0``, ``.5``). Fractions such as ``3/4``, exponents and LaTeX are not numbers here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from rlft_ray.rewards.loading import RewardError

#: Keys read for the reference answer, in order.
ANSWER_KEYS: tuple[str, ...] = ("answer", "ground_truth")

#: Strings that end a completion when a tokenizer's end-of-turn token was decoded as text.
EOS_MARKERS: tuple[str, ...] = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "<eos>",
)

# A number not glued to a digit or a decimal point before it (so "10-3" holds 10 and 3, not
# -3); the thousands-separated form is tried first and must not run on into more digits.
_NUMBER = (
    r"(?P<sign>[-+\u2212])?"
    r"(?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?|(?P<bare>\.\d+))"
)
_NUMBER_RE = re.compile(r"(?<![\d.])" + _NUMBER)
_ONLY_NUMBER_RE = re.compile(r"\s*" + _NUMBER + r"\.?\s*")
_BOXED_RE = re.compile(r"\\boxed\s*\{")


def _to_decimal(match: re.Match[str]) -> Decimal:
    """The exact value of a :data:`_NUMBER_RE` match."""
    sign = "-" if match.group("sign") in ("-", "\u2212") else ""
    if match.group("bare") is not None:
        return Decimal(sign + "0" + match.group("bare"))
    digits = match.group("int").replace(",", "")
    return Decimal(sign + digits + (match.group("frac") or ""))


def parse_number(text: str) -> Decimal | None:
    """``text`` as an exact number when it is one number and nothing else, else None.

    Surrounding whitespace and one trailing period are allowed: ``" 1,234. "`` is 1234,
    ``"-0.5"`` is -0.5, ``"73 apples"`` and ``"3/4"`` are None.
    """
    match = _ONLY_NUMBER_RE.fullmatch(text)
    return _to_decimal(match) if match else None


def last_number(text: str) -> Decimal | None:
    """The last number in ``text`` (see the module docstring), or None when it has none.

    Example: ``last_number("32 + 41 = 73.") == 73``; ``last_number("1,234 apples") == 1234``.
    """
    value = None
    for match in _NUMBER_RE.finditer(text):
        value = _to_decimal(match)
    return value


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces inside it balanced), or
    None when there is none or the last one is never closed.

    Example: ``last_boxed(r"so \\boxed{\\frac{1}{2}}") == r"\\frac{1}{2}"``.
    """
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def cut_at_eos(text: str) -> str:
    """``text`` without anything from the first end-of-turn marker (:data:`EOS_MARKERS`) on."""
    for marker in EOS_MARKERS:
        index = text.find(marker)
        if index != -1:
            text = text[:index]
    return text


def reference_answer(meta: Any) -> Any:
    """The reference answer of one sample: ``meta["answer"]``, else ``meta["ground_truth"]``.

    Raises:
        RewardError: ``meta`` is not a dict, or holds neither key with a value (a null or
            blank one counts as missing, as in prompt files); the message names the keys
            looked for and the ones present.
    """
    if not isinstance(meta, dict):
        raise RewardError(f"metadata must be a dict with an 'answer', got {type(meta).__name__}")
    for key in ANSWER_KEYS:
        value = meta.get(key)
        if value is not None and str(value).strip():
            return value
    raise RewardError(
        "no reference answer: metadata has no 'answer' key (nor 'ground_truth') with a "
        f"value; its keys are {sorted(map(str, meta))}. Give every prompt an 'answer'"
    )


def _reference_number(meta: Any) -> Decimal:
    """The reference answer as a number.

    Raises:
        RewardError: No answer (see :func:`reference_answer`), or one that is not a number.
    """
    answer = reference_answer(meta)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        value: Decimal | None = Decimal(str(answer))  # an int or float column, exactly
        value = value if value.is_finite() else None
    else:
        value = parse_number(str(answer))
    if value is None:
        raise RewardError(
            f"the reference answer {answer!r} is not a number (one number such as '73', "
            "'-1.5' or '1,234'); use rlft_ray.rewards:exact_match or :boxed for other answers"
        )
    return value


def _normalize(text: str) -> str:
    """``text`` stripped of surrounding whitespace and one trailing period."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _check_lengths(completions: Sequence[str], metadata: Sequence[Any]) -> None:
    if len(completions) != len(metadata):
        raise ValueError(f"got {len(completions)} completions but {len(metadata)} metadata entries")


def final_number(
    prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]
) -> list[float]:
    """1.0 where the last number in the completion equals the reference answer numerically.

    Fits chat answers: ``"32 + 41 = 73"``, ``"The answer is **73**."``, ``"73.0"`` and
    ``"1,234"`` match answers 73 and 1234; a completion without a number scores 0.0, and
    so does one whose last number is wrong (``"73, no wait, 72"`` against 73).

    Args:
        prompts: The prompts (unused; part of the reward signature).
        completions: Generated completions.
        metadata: Per-sample dicts with the reference ``"answer"`` (or ``"ground_truth"``),
            one number each.

    Returns:
        One reward in {0.0, 1.0} per completion.

    Raises:
        RewardError: A sample without a reference answer, or with one that is not a number.
    """
    _check_lengths(completions, metadata)
    rewards = []
    for completion, meta in zip(completions, metadata):
        target = _reference_number(meta)
        got = last_number(cut_at_eos(completion))
        rewards.append(float(got is not None and got == target))
    return rewards


def exact_match(
    prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]
) -> list[float]:
    """1.0 where the completion equals the reference answer as text.

    Both are compared stripped of surrounding whitespace and of one trailing period
    (``" 73.\\n"`` matches ``73``); case and everything else count (``"73 apples"`` and
    ``"32 + 41 = 73"`` score 0.0: use :func:`final_number` for those). Unlike
    ``envs.arithmetic:exact_match`` a second line is not cut off.

    Args:
        prompts: The prompts (unused).
        completions: Generated completions.
        metadata: Per-sample dicts with the reference ``"answer"`` (or ``"ground_truth"``).

    Returns:
        One reward in {0.0, 1.0} per completion.

    Raises:
        RewardError: A sample without a reference answer.
    """
    _check_lengths(completions, metadata)
    return [
        float(_normalize(cut_at_eos(c)) == _normalize(str(reference_answer(m))))
        for c, m in zip(completions, metadata)
    ]


def boxed(
    prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]
) -> list[float]:
    """1.0 where the content of the completion's last ``\\boxed{...}`` equals the answer.

    Braces nested inside the box are matched (``\\boxed{\\frac{1}{2}}`` holds
    ``\\frac{1}{2}``). When the content and the answer are both numbers they are compared
    as numbers (``\\boxed{73.0}`` and ``\\boxed{73.}`` match 73), otherwise as text stripped
    of surrounding whitespace. No box scores 0.0.

    Args:
        prompts: The prompts (unused).
        completions: Generated completions.
        metadata: Per-sample dicts with the reference ``"answer"`` (or ``"ground_truth"``).

    Returns:
        One reward in {0.0, 1.0} per completion.

    Raises:
        RewardError: A sample without a reference answer.
    """
    _check_lengths(completions, metadata)
    rewards = []
    for completion, meta in zip(completions, metadata):
        answer = str(reference_answer(meta)).strip()
        content = last_boxed(cut_at_eos(completion))
        if content is None:
            rewards.append(0.0)
            continue
        got, want = parse_number(content), parse_number(answer)
        if got is not None and want is not None:
            rewards.append(float(got == want))
        else:
            rewards.append(float(content.strip() == answer))
    return rewards


def answer_format(
    prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]
) -> list[float]:
    """1.0 where the completion is a single number and nothing else.

    Checks the form, not the value: one number as :func:`parse_number` reads it (sign,
    thousands separators, decimals), optionally followed by one period, with whitespace
    around it (``"73"``, ``" -1,234.5.\\n"``). Words, markdown, a second number or an
    equation score 0.0 (``"**73**"``, ``"73 apples"``, ``"32 + 41 = 73"``). The metadata
    is not read. Add it with a small weight to :func:`final_number` in a reward function of
    your own to teach a chat model to answer with the number alone.

    Args:
        prompts: The prompts (unused).
        completions: Generated completions.
        metadata: Per-sample dicts (unused, but one per completion).

    Returns:
        One reward in {0.0, 1.0} per completion.
    """
    _check_lengths(completions, metadata)
    return [float(parse_number(cut_at_eos(c)) is not None) for c in completions]
