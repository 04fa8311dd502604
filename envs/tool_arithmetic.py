"""``rlft/ToolArithmetic-v0``: multi-digit products a tiny model cannot do in its head,
but can with the calculator tool.

An episode (``digits=3``)::

    obs    "123*456="                       reset: the task
    model  "<calc>123*456</calc>"           a tool call (reward 0)
    obs    "\\n<result>56088</result>\\n"     the tool's reply
    model  "56088"                          the answer: reward 1 if it is the product, done

A turn without a tool tag is the answer (exact match after stripping whitespace; the
episode terminates with reward 1 or 0 and ``info["is_success"]``). A call that cannot be
parsed, names a disabled tool, or fails is a recorded zero-reward turn whose reply is
``<error>...</error>``. After ``max_turns`` model turns the episode is truncated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlft_ray.agents import SandboxLimits, TextEnv, ToolParseError, parse_tool_call, run_tool


def tool_reply(
    text: str, tools: tuple[str, ...], limits: SandboxLimits | None = None
) -> tuple[str | None, dict[str, Any]]:
    """The env's reply to a turn that calls a tool, and ``info`` counts; ``(None, {})``
    when the turn calls no tool (it is an answer). Shared by the tool environments."""
    try:
        call = parse_tool_call(text)
    except ToolParseError as exc:
        return f"\n<error>{exc}</error>\n", {"tool_calls": 0, "tool_error": str(exc)}
    if call is None:
        return None, {}
    reply, ok = run_tool(call, tools, limits)
    info: dict[str, Any] = {"tool_calls": 1}
    if not ok:
        info["tool_error"] = reply
        return f"\n<error>{reply}</error>\n", info
    return f"\n<result>{reply}</result>\n", info


class ToolArithmeticEnv(TextEnv):
    """Products of two ``digits``-digit numbers, with tools.

    Args:
        digits: Digits of each operand (3: 100..999).
        op: ``*`` (products) or ``+`` (sums).
        tools: Tools the model may call (``calc``, ``python``); ``()``: none (the no-tool
            control: every call is refused).
        max_turns: Model turns before the episode is truncated.
        python_limits: :class:`~rlft_ray.agents.SandboxLimits` fields of the Python tool
            (``cpu_s``, ``memory_mb``, ``wall_s``, ...); keep ``wall_s`` below
            ``env.step_timeout_s`` so a slow call is a tool error, not a failed episode.
    """

    def __init__(
        self,
        digits: int = 3,
        op: str = "*",
        tools: tuple[str, ...] | list[str] = ("calc",),
        max_turns: int = 3,
        python_limits: dict[str, Any] | None = None,
    ) -> None:
        if digits < 1 or op not in ("*", "+") or max_turns < 1:
            raise ValueError(
                f"digits >= 1, op in * +, max_turns >= 1 (got {digits}, {op!r}, {max_turns})"
            )
        self.digits, self.op, self.tools, self.max_turns = digits, op, tuple(tools), max_turns
        self.limits = SandboxLimits(**(python_limits or {}))
        self.a = self.b = self.turn = 0

    @property
    def answer(self) -> int:
        return self.a * self.b if self.op == "*" else self.a + self.b

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        low, high = 10 ** (self.digits - 1), 10**self.digits
        self.a, self.b = (int(v) for v in self.np_random.integers(low, high, size=2))
        self.turn = 0
        return f"{self.a}{self.op}{self.b}=", {"answer": self.answer}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.turn += 1
        reply, info = tool_reply(action, self.tools, self.limits)
        if reply is not None:  # a tool call (or a failed one): no reward yet
            return reply, 0.0, False, self.turn >= self.max_turns, info
        correct = action.strip() == str(self.answer)
        return "", float(correct), True, False, {"is_success": correct, "tool_calls": 0}


def demonstrations(
    n: int, seed: int = 0, tool_frac: float = 0.5, digits: int = 3
) -> list[dict[str, Any]]:
    """``n`` solved episodes for a supervised pass (``rlft_ray.lm.sft``'s ``segments``
    rows): a ``tool_frac`` share calls the calculator and copies its result, the rest
    answers directly (the product itself: what a model without tools must compute in
    its head). Reset seeds ``seed + 10_000_000 + i``, away from training and held-out seeds."""
    env = ToolArithmeticEnv(digits=digits)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt, info = env.reset(seed=seed + 10_000_000 + i)
        answer = str(info["answer"])
        if rng.random() < tool_frac:
            call = f"<calc>{env.a}{env.op}{env.b}</calc>"
            reply, _, _, _, _ = env.step(call)
            segments = [(call, True), (reply, False), (answer, True)]
        else:
            segments = [(answer, True)]
        rows.append({"prompt": prompt, "segments": segments})
    return rows
