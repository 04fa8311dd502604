"""The README's custom text environment runs as printed: it registers, passes gymnasium's
env checker, and a scripted calculator user solves it through the multi-turn rollout."""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
from gymnasium.utils.env_checker import check_env
from test_agent_rollout import TOK, calculator_user, scripted

from rlft_ray.agents import make_text_env
from rlft_ray.rollout.multiturn import TurnLimits, run_episodes

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    block = re.search(r"<!-- agents-example -->\n```python\n(.*?)```", text, re.DOTALL)
    assert block, "README lost its agents example"
    return block.group(1)


def test_readme_custom_env_example_runs() -> None:
    code = _example()
    assert len(code.splitlines()) <= 40  # "a 30-line custom environment"
    namespace: dict = {}
    if "my/AddThree-v0" in gym.registry:
        del gym.registry["my/AddThree-v0"]
    exec(compile(code, "README.md", "exec"), namespace)
    env = make_text_env("my/AddThree-v0")
    check_env(env.unwrapped, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    nums = [int(n) for n in obs.rstrip("=").split("+")]
    reply, *_ = env.step("<calc>1+</calc>")
    assert reply.startswith("\n<error>not an arithmetic expression")
    limits = TurnLimits(max_turns=3, max_new_tokens=40, max_tokens=120, step_timeout_s=5.0)
    batch = run_episodes(
        scripted(calculator_user), TOK, lambda: gym.make("my/AddThree-v0"), [0], 2, limits
    )
    assert batch.rewards.tolist() == [1.0, 1.0]
    assert batch.completions[0].endswith(str(sum(nums)))
    assert batch.agent.tool_calls.tolist() == [1, 1]
