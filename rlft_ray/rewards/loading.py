"""Loading and safely calling reward functions.

A reward function has the signature
``fn(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]`` and is
named in configs as ``"package.module:function"`` (e.g. ``"rlft_ray.rewards:final_number"``).
:func:`compute_rewards` turns every way such a function can misbehave into a :class:`RewardError`
that names the function and, where possible, the offending sample. Pure Python (no Ray).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rlft_ray.core.errors import DeterministicError

RewardFn = Callable[[list[str], list[str], list[dict[str, Any]]], Sequence[float]]

_MODULE_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_PROMPT_PREVIEW_CHARS = 200
logger = logging.getLogger(__name__)


class RewardError(DeterministicError, RuntimeError):
    """A reward function raised, or returned something that is not one finite float per sample."""


def load_reward_fn(spec: str | RewardFn) -> RewardFn:
    """Import a reward function from a ``"package.module:function"`` spec.

    The attribute part may be dotted (``"pkg.mod:Class.method"``). A callable is returned as is,
    so configs can hold either a spec string or the function itself.

    Args:
        spec: ``"module.path:attribute"`` or a callable.

    Returns:
        The callable.

    Raises:
        ValueError: Malformed spec, module that cannot be imported, missing attribute, or an
            attribute that is not callable; the message names the failing piece.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"reward spec must be a 'module:function' string, got {type(spec).__name__}"
        )
    module_name, sep, attr_path = spec.strip().partition(":")
    if not sep or ":" in attr_path:
        raise ValueError(
            f"malformed reward spec {spec!r}: expected exactly one ':' as in "
            "'package.module:function'"
        )
    if not _MODULE_RE.fullmatch(module_name):
        raise ValueError(f"malformed reward spec {spec!r}: invalid module path {module_name!r}")
    if not _MODULE_RE.fullmatch(attr_path):
        raise ValueError(f"malformed reward spec {spec!r}: invalid function name {attr_path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import reward module {module_name!r} (spec {spec!r}): {e}") from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(
                f"reward module {module_name!r} has no attribute {attr_path!r} "
                f"(missing {part!r}; spec {spec!r}){_suggest(obj, part)}"
            ) from e
    if not callable(obj):
        raise ValueError(f"reward spec {spec!r} names a {type(obj).__name__}, not a callable")
    return obj


def _suggest(obj: Any, missing: str) -> str:
    """``"; did you mean 'x'?"`` naming the public callables of ``obj`` closest to ``missing``."""
    names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
    close = [repr(n) for n in difflib.get_close_matches(missing, names, n=3)]
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f"; did you mean {listed}?"


def _fn_name(fn: Callable[..., Any]) -> str:
    """A readable name for ``fn`` ("module:qualname"), unwrapping functools.partial."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}:{qualname}" if module else qualname


def _preview(prompt: Any) -> str:
    text = repr(prompt)
    if len(text) > _PROMPT_PREVIEW_CHARS:
        text = text[:_PROMPT_PREVIEW_CHARS] + "...'"
    return text


def _find_failing_sample(
    fn: RewardFn, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]
) -> tuple[int, BaseException] | None:
    """Re-run ``fn`` one sample at a time; return the first index that raises and its error."""
    for i in range(len(prompts)):
        try:
            fn([prompts[i]], [completions[i]], [metadata[i]])
        except Exception as e:
            return i, e
    return None


def compute_rewards(
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    metadata: Sequence[dict[str, Any]],
) -> list[float]:
    """Call ``fn`` on a batch and validate its output.

    Args:
        fn: Reward function ``fn(prompts, completions, metadata) -> list[float]``.
        prompts: One prompt per sample.
        completions: One completion per sample.
        metadata: One dict per sample (e.g. with the reference ``"answer"``).

    Returns:
        One finite float per sample.

    Raises:
        ValueError: The three inputs differ in length (a caller bug, not the reward's).
        RewardError: ``fn`` raised (the message names the first failing sample index and its
            prompt when re-running ``fn`` one sample at a time reproduces the error), returned
            the wrong number of values, or returned a NaN/inf or non-number value.
    """
    prompts, completions, metadata = list(prompts), list(completions), list(metadata)
    n = len(prompts)
    if len(completions) != n or len(metadata) != n:
        raise ValueError(
            f"prompts, completions and metadata must have equal lengths, got "
            f"{n}, {len(completions)}, {len(metadata)}"
        )
    name = _fn_name(fn)
    raw = _call(fn, name, prompts, completions, metadata)
    return _check_values(raw, name, prompts)


def _call(
    fn: RewardFn,
    name: str,
    prompts: list[str],
    completions: list[str],
    metadata: list[dict[str, Any]],
) -> Any:
    """``fn``'s raw output; a :class:`RewardError` naming the first failing sample if it raises."""
    n = len(prompts)
    try:
        # Pass list copies so a reward function that reorders/pops its inputs cannot corrupt
        # the lists used below for error messages.
        return fn(list(prompts), list(completions), list(metadata))
    except Exception as e:
        # With one sample the culprit is known; otherwise re-run per sample to find it.
        failing = (0, e) if n == 1 else _find_failing_sample(fn, prompts, completions, metadata)
        if failing is not None:
            idx, sample_err = failing
            where = f"sample {idx} (prompt {_preview(prompts[idx])})"
            if type(sample_err) is type(e) and str(sample_err) == str(e):
                detail = f"{type(e).__name__}: {e} on {where}"
            else:  # the per-sample error differs; report both rather than guess
                detail = (
                    f"{type(e).__name__}: {e}; re-run alone, {where} raised "
                    f"{type(sample_err).__name__}: {sample_err}"
                )
            raise RewardError(f"reward function {name} raised {detail}") from e
        raise RewardError(
            f"reward function {name} raised {type(e).__name__}: {e} "
            f"(batch of {n}; no single sample reproduces it)"
        ) from e


def _check_values(raw: Any, name: str, prompts: list[str]) -> list[float]:
    """One finite float per sample, or a :class:`RewardError` naming the bad one."""
    n = len(prompts)
    try:
        values = list(raw)
    except TypeError as e:
        raise RewardError(
            f"reward function {name} must return a list of {n} floats, got {type(raw).__name__}"
        ) from e
    if len(values) != n:
        raise RewardError(
            f"reward function {name} returned the wrong number of rewards: "
            f"expected {n} (one per completion), got {len(values)}"
        )

    rewards: list[float] = []
    for i, value in enumerate(values):
        reward: float | None = None
        if isinstance(value, numbers.Real) or (
            hasattr(value, "__float__") and not isinstance(value, (str, bytes))
        ):
            try:
                reward = float(value)
            except (TypeError, ValueError):  # e.g. a multi-element tensor
                reward = None
        if reward is None:
            raise RewardError(
                f"reward function {name} returned a non-number for sample {i} "
                f"(prompt {_preview(prompts[i])}): {value!r} ({type(value).__name__})"
            )
        if not math.isfinite(reward):
            raise RewardError(
                f"reward function {name} returned {reward} for sample {i} "
                f"(prompt {_preview(prompts[i])}); rewards must be finite"
            )
        rewards.append(reward)
    return rewards


def call_with_timeout(fn: Callable[[], Any], timeout_s: float | None) -> Any:
    """``fn()``, or None when it has not returned after ``timeout_s`` (None: no bound).
    It runs in a daemon thread that is left behind on a timeout (a Python thread cannot
    be killed); what it raises is raised here."""
    if timeout_s is None:
        return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="reward-fn")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return None
    if "error" in box:
        raise box["error"]
    return box["value"]


def compute_rewards_within(
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    metadata: Sequence[dict],
    timeout_s: float | None,
) -> list[float] | None:
    """:func:`compute_rewards` bounded by ``timeout_s`` (``lm.reward_timeout_s``): None, with
    a warning naming the function, when it has not returned in time (the caller scores
    the samples 0 and goes on)."""
    out = call_with_timeout(lambda: compute_rewards(fn, prompts, completions, metadata), timeout_s)
    if out is None:
        logger.warning(
            "reward function %s did not return within %g s (lm.reward_timeout_s): "
            "%d samples scored 0",
            getattr(fn, "__qualname__", fn),
            timeout_s,
            len(completions),
        )
    return out
