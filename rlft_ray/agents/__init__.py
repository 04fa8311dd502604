"""LM agents in gymnasium text environments: the text-env protocol and the tools.

* :mod:`rlft_ray.agents.text_env` — :class:`TextEnv`, a ``gymnasium.Env`` whose
  observations and actions are text, :func:`make_text_env` and :func:`check_text_env`;
* :mod:`rlft_ray.agents.tools` — the tool-call format (``<calc>...</calc>``,
  ``<python>...</python>``) and the calculator (safe arithmetic through ``ast``);
* :mod:`rlft_ray.agents.sandbox` — the sandboxed Python tool (a resource-limited
  subprocess, killed on timeout).

Pure Python (no torch, no Ray): the multi-turn rollout that drives a model through
these environments is :mod:`rlft_ray.rollout.multiturn`.
"""

from rlft_ray.agents.sandbox import SandboxLimits, SandboxResult, run_python
from rlft_ray.agents.text_env import (
    TEXT_CHARSET,
    NotTextEnvError,
    StepTimeout,
    TextEnv,
    TextEnvError,
    check_text_env,
    is_text_env,
    make_text_env,
    step_with_timeout,
)
from rlft_ray.agents.tools import (
    CalculatorError,
    ToolCall,
    ToolParseError,
    calculator,
    parse_tool_call,
    run_tool,
)

__all__ = [
    "TEXT_CHARSET",
    "CalculatorError",
    "NotTextEnvError",
    "SandboxLimits",
    "SandboxResult",
    "StepTimeout",
    "TextEnv",
    "TextEnvError",
    "ToolCall",
    "ToolParseError",
    "calculator",
    "check_text_env",
    "is_text_env",
    "make_text_env",
    "parse_tool_call",
    "run_python",
    "run_tool",
    "step_with_timeout",
]
