"""Text-environment protocol, the shipped text envs (hand-computed rewards), tool-call
parsing, the calculator and the sandboxed Python tool's limits."""

from __future__ import annotations

import signal
import time

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.guess_number import GuessNumberEnv
from envs.text_navigation import TextNavigationEnv
from envs.tool_arithmetic import ToolArithmeticEnv
from rlft_ray.agents import (
    CalculatorError,
    NotTextEnvError,
    SandboxLimits,
    TextEnv,
    TextEnvError,
    ToolCall,
    ToolParseError,
    calculator,
    make_text_env,
    parse_tool_call,
    run_python,
    step_with_timeout,
)

# ----------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("env_id", sorted(envs.TEXT_ENVS))
def test_text_envs_pass_gymnasiums_env_checker(env_id: str) -> None:
    env = make_text_env(env_id)
    check_env(env.unwrapped, skip_render_check=True)  # text spaces, seeding, random actions
    first, _ = env.reset(seed=7)
    again, _ = env.reset(seed=7)
    assert isinstance(first, str) and first == again


def test_unregistered_and_non_text_ids_fail_naming_the_id() -> None:
    with pytest.raises(TextEnvError, match="not a registered.*did you mean rlft/GuessNumber-v0"):
        make_text_env("GuessNumber-v0")
    with pytest.raises(NotTextEnvError, match="CartPole-v1.*not a text environment"):
        make_text_env("CartPole-v1")
    with pytest.raises(TextEnvError, match="cannot be made.*digits"):
        make_text_env("rlft/ToolArithmetic-v0", {"digits": 0})


class _Hangs(TextEnv):
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "go", {}

    def step(self, action):
        if action == "hang":
            time.sleep(5)
        if action == "raise":
            raise RuntimeError("tool crashed")
        if action == "number":
            return 42, 0.0, False, False, {}
        return "ok", 1.0, True, False, {}


def test_a_hung_raising_or_non_text_step_is_a_recorded_failure_not_a_hang() -> None:
    started = time.perf_counter()
    out = step_with_timeout([_Hangs() for _ in range(4)], ["hang", "raise", "number", "fine"], 0.3)
    assert time.perf_counter() - started < 2.0  # bounded by the timeout, steps concurrent
    assert "timed out after 0.3 s" in out[0].error and out[0].result is None
    assert "RuntimeError: tool crashed" in out[1].error
    assert "int observation" in out[2].error
    assert out[3].error is None and out[3].result == ("ok", 1.0, True, False, {})


class _Sleeps(TextEnv):
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "go", {}

    def step(self, action):
        time.sleep(float(action))
        return "ok", 0.0, False, False, {}


def _step_threads() -> int:
    import threading

    return sum(t.name == "env-step" for t in threading.enumerate())


def test_step_workers_are_reused_and_a_hung_one_is_replaced() -> None:
    step_with_timeout([_Sleeps() for _ in range(6)], ["0"] * 6, 5.0)
    before = _step_threads()
    for _ in range(5):  # no new thread per step once enough workers wait
        assert all(o.error is None for o in step_with_timeout([_Sleeps()] * 6, ["0"] * 6, 5.0))
    assert _step_threads() == before
    # One step hangs past the deadline: its worker stays stuck, a replacement serves the
    # next call, whose 6 slow steps still overlap (6 x 0.2 s sequentially would be 1.2 s).
    out = step_with_timeout([_Sleeps() for _ in range(2)], ["1.5", "0"], 0.2)
    assert "timed out" in out[0].error and out[1].error is None
    started = time.perf_counter()
    out = step_with_timeout([_Sleeps() for _ in range(6)], ["0.2"] * 6, 5.0)
    assert all(o.error is None for o in out)
    assert time.perf_counter() - started < 0.9
    assert _step_threads() <= before + 1  # at most the stuck worker's replacement


# ------------------------------------------------------------------------------- tools


def test_calculator_evaluates_arithmetic_without_eval() -> None:
    assert calculator("123*456") == "56088"
    assert calculator("(2+3)*-4") == "-20"
    assert calculator("7/2") == "3.5" and calculator("8/2") == "4"
    assert calculator("2**10 % 1000") == "24"
    for bad, why in [
        ("__import__('os').system('ls')", "Call is not allowed"),
        ("x + 1", "Name is not allowed"),
        ("9**9**9", "power too large"),
        ("1/0", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("'a' * 3", "Constant is not allowed"),
    ]:
        with pytest.raises(CalculatorError, match=why):
            calculator(bad)


def test_tool_call_parsing() -> None:
    assert parse_tool_call("<calc>12*34</calc>") == ToolCall("calc", "12*34")
    assert parse_tool_call("let me <python>print(1)</python>") == ToolCall("python", "print(1)")
    assert parse_tool_call("408") is None  # an answer
    for bad, why in [
        ("<calc>12*", "unclosed or unmatched tag: <calc>"),
        ("<search>x</search>", "unknown tool: <search>"),
        ("<calc>1</calc><calc>2</calc>", "2 tool calls"),
    ]:
        with pytest.raises(ToolParseError, match=why):
            parse_tool_call(bad)


def test_sandbox_runs_code_in_a_fresh_directory_without_sockets() -> None:
    ok = run_python("print(sum(range(10)))")
    assert ok.ok and ok.output == "45" and ok.reason is None
    cwd = run_python("import os; print(os.listdir('.'))")
    assert cwd.output == "[]"  # a fresh temporary directory
    net = run_python("import socket")
    assert net.reason == "error" and "socket" in net.output  # blocked (best effort)


def test_sandbox_kills_a_cpu_loop_at_its_cpu_limit() -> None:
    cpu = run_python("while True: pass", SandboxLimits(cpu_s=1, wall_s=30))
    assert cpu.reason == "cpu_limit" and not cpu.ok  # RLIMIT_CPU, not the wall clock
    assert cpu.returncode == -signal.SIGXCPU and "over 1 s of CPU time" in cpu.output


def test_sandbox_refuses_a_memory_bomb_and_kills_a_sleeper() -> None:
    mem = run_python("x = bytearray(2 * 1024**3)", SandboxLimits(memory_mb=128))
    assert mem.reason == "memory_limit"  # refused by RLIMIT_AS
    slow = run_python("import time; time.sleep(30)", SandboxLimits(wall_s=0.5))
    assert slow.reason == "timeout" and slow.returncode == -signal.SIGKILL
    assert slow.seconds < 5  # sleeping uses no CPU time: the wall clock ends it


# ------------------------------------------------------------------------------ the envs


def test_tool_arithmetic_rewards_by_hand() -> None:
    env = ToolArithmeticEnv(digits=3)
    obs, info = env.reset(seed=0)
    a, b = env.a, env.b
    assert obs == f"{a}*{b}=" and info["answer"] == a * b
    reply, r, term, trunc, info = env.step(f"<calc>{a}*{b}</calc>")
    assert reply == f"\n<result>{a * b}</result>\n" and (r, term, trunc) == (0.0, False, False)
    assert info["tool_calls"] == 1
    _, r, term, _, info = env.step(f" {a * b} ")
    assert (r, term, info["is_success"]) == (1.0, True, True)
    env.reset(seed=0)
    _, r, term, _, info = env.step(str(a * b + 1))  # a wrong answer without the tool
    assert (r, term, info["is_success"]) == (0.0, True, False)


def test_tool_arithmetic_chat_episodes_for_an_instruct_model() -> None:
    """chat=True: ChatML turns with the instruction and one worked episode, the tool's
    reply as a user message, the turn's last number as the answer; call_bonus rewards the
    first call that runs, once."""
    env = ToolArithmeticEnv(chat=True, call_bonus=0.25)
    obs, info = env.reset(seed=0)
    a, b = env.a, env.b
    assert obs.startswith("<|im_start|>system\nYou have a calculator.")
    assert "<|im_start|>assistant\n<calc>12*34</calc><|im_end|>\n" in obs  # the worked one
    assert obs.endswith(f"<|im_start|>user\nWhat is {a} * {b}?<|im_end|>\n<|im_start|>assistant\n")
    reply, r, term, _, _ = env.step(f"<calc>{a}*{b}</calc>")
    assert reply == (
        f"\n<|im_start|>user\n<result>{a * b}</result><|im_end|>\n<|im_start|>assistant\n"
    )
    assert (r, term) == (0.25, False)
    assert env.step("<calc>1+1</calc>")[1] == 0.0  # the bonus is paid once
    _, r, term, _, info = env.step(f"The answer is {a * b:,}.")
    assert (r, term, info["is_success"]) == (1.0, True, True)
    env.reset(seed=0)
    assert env.step("<calc>1+</calc>")[1] == 0.0  # a call that fails earns nothing
    assert env.step(f"{a * b} is not {a * b + 1}")[1] == 0.0  # the last number counts
    with pytest.raises(ValueError, match="instruction is the system message of chat"):
        ToolArithmeticEnv(instruction="Use the calculator.")


def test_tool_arithmetic_bad_calls_are_recorded_zero_reward_turns() -> None:
    env = ToolArithmeticEnv(max_turns=3)
    env.reset(seed=1)
    reply, r, term, trunc, info = env.step("<calc>12*")
    assert reply.startswith("\n<error>unclosed") and (r, term, trunc) == (0.0, False, False)
    assert "tool_error" in info
    reply, *_ = env.step("<calc>os.system(1)</calc>")
    assert "<error>" in reply and "not allowed" in reply
    _, _, _, trunc, _ = env.step("<calc>1+1</calc>")
    assert trunc  # the third turn of max_turns=3
    no_tools = ToolArithmeticEnv(tools=())
    no_tools.reset(seed=1)
    reply, *_ = no_tools.step("<calc>1+1</calc>")
    assert reply == "\n<error>tool calc is not available</error>\n"


def test_python_tool_in_the_env() -> None:
    env = ToolArithmeticEnv(tools=("python",), python_limits={"wall_s": 0.5})
    env.reset(seed=2)
    reply, *_ = env.step(f"<python>print({env.a}*{env.b})</python>")
    assert reply == f"\n<result>{env.a * env.b}</result>\n"
    reply, _, _, _, info = env.step("<python>import time; time.sleep(9)</python>")
    assert reply == "\n<error>timeout: killed after 0.5 s</error>\n" and "tool_error" in info


def test_guess_number_reward_falls_with_turns() -> None:
    env = GuessNumberEnv(high=16, max_turns=8)
    env.reset(seed=3)
    secret = env.secret
    low, high = (secret - 1, secret + 1) if 1 < secret < 16 else (None, None)
    if low is not None:
        assert env.step(str(low))[0] == f" higher {low + 1}-16?"
        assert env.step(str(high))[0] == f" lower {low + 1}-{high - 1}?"
        reply, r, term, _, info = env.step(str(secret))
        assert (reply, r, term, info["turns"]) == ("", 1.0 - 2 / 8, True, 3)  # third guess
    env.reset(seed=3)
    assert env.step(str(secret))[1] == 1.0  # first guess
    env.reset(seed=3)
    reply, r, term, trunc, info = env.step("eight")
    assert (reply, r, term, trunc, info) == (" ?", 0.0, False, False, {"invalid": True})


def test_guess_number_demonstrations_leave_grpo_room_below_the_in_range_strategy() -> None:
    import re

    from envs.guess_number import demonstrations

    def turns_and_out_of_range(rows: list[dict]) -> tuple[float, int]:
        turns, outside = [], 0
        for row in rows:
            lo, hi = 1, 16
            for text, model in row["segments"]:
                if model:
                    outside += not lo <= int(text) <= hi
                elif m := re.search(r"(\d+)-(\d+)\?", text):
                    lo, hi = int(m[1]), int(m[2])
            turns.append(sum(model for _, model in row["segments"]))
        return sum(turns) / len(turns), outside

    informed, outside = turns_and_out_of_range(demonstrations(2000, informed_frac=1.0))
    assert outside == 0 and abs(informed - 4.18) < 0.15  # 2 (17/16) H_16 - 3
    blind, outside = turns_and_out_of_range(demonstrations(2000, informed_frac=0.0))
    assert outside > 1000 and abs(blind - 6.45) < 0.15  # (1 - (15/16)^8) * 16
    mixed, _ = turns_and_out_of_range(demonstrations(2000, seed=1))
    assert abs(mixed - (informed + blind) / 2) < 0.2
    assert 1 - 3.375 / mixed > 0.3  # bisection (3.375 turns) is >= 30 % below the base's demos


def test_text_navigation_moves_and_rewards_by_hand() -> None:
    env = TextNavigationEnv(size=5, max_moves=2, max_turns=8)
    env.reset(seed=0)
    env.pos, env.goal = (1, 2), (3, 0)
    reply, r, term, _, _ = env.step("rr")
    assert (reply, r, term) == (" at 3,2>", -0.1, False)
    reply, r, _, _, info = env.step("rrr")  # three moves: invalid, nothing moves
    assert (reply, r, info) == (" at 3,2>", -0.1, {"invalid": True})
    reply, r, term, _, info = env.step("dd")
    assert (reply, r, term, info["is_success"]) == ("", 1.0, True, True)
    env.pos = (4, 4)
    assert env.step("ur")[0] == " at 4,4>"  # the grid's edge stops moves


def test_registered_ids_make_the_classes() -> None:
    for env_id, entry in envs.TEXT_ENVS.items():
        env = gym.make(env_id)
        assert type(env.unwrapped).__name__ == entry.split(":")[1]
