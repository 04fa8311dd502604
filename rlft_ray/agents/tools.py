"""The tool-call format and the calculator tool.

A model calls a tool by writing its input between the tool's tags, anywhere in its turn::

    <calc>123*456</calc>
    <python>print(sum(range(10)))</python>

:func:`parse_tool_call` finds the call (a turn with no tag is a plain answer); a turn that
opens a tag without closing it, names an unknown tool or holds two calls is a
:class:`ToolParseError`, which the environments record as a zero-reward turn with an
``<error>`` reply, never a crash. :func:`run_tool` executes a call: the calculator
evaluates arithmetic by walking the ``ast`` (no ``eval``), the Python tool runs in
:func:`rlft_ray.agents.sandbox.run_python`.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass

from rlft_ray.agents.sandbox import SandboxLimits, run_python

#: The shipped tools, by tag.
TOOLS: tuple[str, ...] = ("calc", "python")
_CALL = re.compile(r"<(calc|python)>(.*?)</\1>", re.DOTALL)
_OPEN = re.compile(r"<(/?)([a-z_]+)>")
#: Largest magnitude a calculator result or power may reach (no 9**9**9 hangs).
CALC_MAX = 10**30
CALC_MAX_CHARS = 200


class ToolParseError(ValueError):
    """A turn that tries to call a tool but whose call cannot be parsed."""


class CalculatorError(ValueError):
    """An expression the calculator refuses (not arithmetic, too large, division by 0)."""


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: ``name`` (``calc`` / ``python``) and its ``body`` text."""

    name: str
    body: str


def parse_tool_call(text: str) -> ToolCall | None:
    """The tool call in a model turn, or None when the turn calls no tool.

    Raises:
        ToolParseError: A tag is opened but not closed, a tag names no shipped tool, or
            the turn holds more than one call.
    """
    calls = _CALL.findall(text)
    if len(calls) > 1:
        raise ToolParseError(f"{len(calls)} tool calls in one turn (one per turn)")
    rest = _CALL.sub("", text)
    stray = [m.group(0) for m in _OPEN.finditer(rest)]
    if stray:
        name = _OPEN.search(rest).group(2)  # type: ignore[union-attr]
        why = "unknown tool" if name not in TOOLS else "unclosed or unmatched tag"
        raise ToolParseError(f"{why}: {stray[0]}")
    if not calls:
        return None
    name, body = calls[0]
    return ToolCall(name, body.strip())


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression safely: numbers, ``+ - * / // % **`` and parentheses,
    walked node by node through ``ast`` (never ``eval``); powers and results bounded by
    :data:`CALC_MAX`.

    Returns:
        The value as text: an int when it is integral (``"56088"``), else up to 10
        significant digits.

    Raises:
        CalculatorError: Anything else (names, calls, attributes, strings), a syntax
            error, division by zero or a too-large value.
    """
    if len(expression) > CALC_MAX_CHARS:
        raise CalculatorError(f"expression longer than {CALC_MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {exc.msg}") from None

    def walk(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > CALC_MAX):
                raise CalculatorError("power too large")
            try:
                value = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            if isinstance(value, complex) or abs(value) > CALC_MAX:
                raise CalculatorError("result out of range")
            return value
        raise CalculatorError(
            f"{type(node).__name__} is not allowed (numbers and + - * / % ** only)"
        )

    value = walk(tree)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("result is not finite")
        if value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def run_tool(
    call: ToolCall, allowed: tuple[str, ...], limits: SandboxLimits | None = None
) -> tuple[str, bool]:
    """Execute ``call`` if its tool is ``allowed``: ``(reply text, ok)``. A refused or
    failing call gives its reason as the reply and ``ok=False`` (a recorded failure)."""
    if call.name not in allowed:
        return f"tool {call.name} is not available", False
    if call.name == "calc":
        try:
            return calculator(call.body), True
        except CalculatorError as exc:
            return str(exc), False
    result = run_python(call.body, limits or SandboxLimits())
    return result.output, result.ok
