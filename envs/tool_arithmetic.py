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

An instruct model does not know the tool format: ``chat=True`` writes the conversation in
ChatML (SmolLM2, Qwen: the model's turns end with its ``<|im_end|>`` EOS, which stays in
the conversation) with ``instruction`` as the system message, the question as the user's
message and each tool reply as a user message; the answer is then the last number of
the turn (an instruct model says "The answer is 56088.")::

    obs    "<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\nWhat is 123 * 456?<|im_end|>\n<|im_start|>assistant\n"
    model  "<calc>123*456</calc><|im_end|>"
    obs    "\n<|im_start|>user\n<result>56088</result><|im_end|>\n<|im_start|>assistant\n"
    model  "The answer is 56088.<|im_end|>"
"""

from __future__ import annotations

import re
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
        chat: ChatML turns for an instruct model (module docstring); the answer is the
            turn's last number.
        instruction: The system message of ``chat`` episodes (default
            :data:`INSTRUCTION`: the tool format).
        call_bonus: Reward of an episode's first tool call that runs (a format reward, as
            tool-use RL recipes such as ToolRL, Qian et al. 2025, add to the answer's):
            an instruct model that rarely calls the tool at first gets a signal before
            it answers right. 0 (default): the answer alone is rewarded.
    """

    def __init__(
        self,
        digits: int = 3,
        op: str = "*",
        tools: tuple[str, ...] | list[str] = ("calc",),
        max_turns: int = 3,
        python_limits: dict[str, Any] | None = None,
        chat: bool = False,
        instruction: str | None = None,
        call_bonus: float = 0.0,
    ) -> None:
        if digits < 1 or op not in ("*", "+") or max_turns < 1:
            raise ValueError(
                f"digits >= 1, op in * +, max_turns >= 1 (got {digits}, {op!r}, {max_turns})"
            )
        if instruction is not None and not chat:
            raise ValueError("instruction is the system message of chat=True episodes")
        self.digits, self.op, self.tools, self.max_turns = digits, op, tuple(tools), max_turns
        self.limits = SandboxLimits(**(python_limits or {}))
        self.chat, self.instruction = chat, INSTRUCTION if instruction is None else instruction
        self.call_bonus = call_bonus
        self.a = self.b = self.turn = self.calls = 0

    @property
    def answer(self) -> int:
        return self.a * self.b if self.op == "*" else self.a + self.b

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        low, high = 10 ** (self.digits - 1), 10**self.digits
        self.a, self.b = (int(v) for v in self.np_random.integers(low, high, size=2))
        self.turn = self.calls = 0
        if self.chat:
            shot = (  # one worked episode: a 135M instruct model imitates it, not the words
                _im("user", f"What is 12 {self.op} 34?")
                + _im("assistant", f"<calc>12{self.op}34</calc>")
                + _im("user", f"<result>{12 * 34 if self.op == '*' else 46}</result>")
                + _im("assistant", str(12 * 34 if self.op == "*" else 46))
            )
            question = _im("user", f"What is {self.a} {self.op} {self.b}?")
            return _im("system", self.instruction) + shot + question + _ASSISTANT, {
                "answer": self.answer
            }
        return f"{self.a}{self.op}{self.b}=", {"answer": self.answer}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.turn += 1
        reply, info = tool_reply(action, self.tools, self.limits)
        if reply is not None:  # a tool call (or a failed one): no answer yet
            bonus = self.call_bonus if "tool_error" not in info and self.calls == 0 else 0.0
            self.calls += int(info.get("tool_calls", 0))
            if self.chat:  # the tool's reply as the user's message, then the model's turn
                reply = "\n" + _im("user", reply.strip("\n")) + _ASSISTANT
            return reply, bonus, False, self.turn >= self.max_turns, info
        if self.chat:
            numbers = re.findall(r"-?\d+", action.replace(",", ""))
            correct = bool(numbers) and numbers[-1] == str(self.answer)
        else:
            correct = action.strip() == str(self.answer)
        return "", float(correct), True, False, {"is_success": correct, "tool_calls": 0}


#: The system message of ``chat=True`` episodes: the tool format, for an instruct model.
INSTRUCTION = (
    "You have a calculator. To use it, reply with only <calc>EXPRESSION</calc>, for example "
    "<calc>12*34</calc>; its result comes back as <result>VALUE</result>. "
    "Then reply with the final number."
)
_ASSISTANT = "<|im_start|>assistant\n"


def _im(role: str, text: str) -> str:
    """One ChatML message."""
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


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
