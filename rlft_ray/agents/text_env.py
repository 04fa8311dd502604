"""The text-environment protocol: an LM is a gymnasium agent whose actions are its text.

A text environment is a ``gymnasium.Env`` whose observations and actions are strings:

* ``reset(seed=s)`` returns ``(observation, info)``: the task as text (the prompt the model
  continues), the same text for the same seed;
* ``step(text)`` takes the model's whole turn (its sampled tokens decoded) and returns
  ``(observation, reward, terminated, truncated, info)``: the environment's reply as the
  text appended to the conversation before the model's next turn (the env writes its own
  turn markers, e.g. ``"\\n<result>408</result>\\n"``), the reward of this turn, and
  whether the episode ended.

``info`` may carry ``tool_calls`` (tool calls this turn), ``tool_error`` (a call that could
not be parsed or failed: a recorded, zero-reward turn) and ``is_success`` (the episode
solved the task; the held-out accuracy counts it).

Subclass :class:`TextEnv` (it sets text spaces that ``gymnasium.utils.env_checker``
accepts) and register the class with ``gymnasium.register``; a run names it as
``env: {id: ..., kwargs: ...}``. The rollout (:mod:`rlft_ray.rollout.multiturn`) runs
every ``step`` under ``env.step_timeout_s`` (:func:`step_with_timeout`).
"""

from __future__ import annotations

import functools
import importlib
import queue
import string
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

#: Characters a text observation / action may hold (``gym.spaces.Text``'s charset).
TEXT_CHARSET = frozenset(string.printable)
#: Longest observation or action text the spaces admit.
MAX_TEXT = 4096


class TextEnvError(ValueError):
    """An environment that breaks the text protocol (non-text observation, unknown id)."""


class TextEnv(gym.Env[str, str]):
    """Base class of text environments: text observation and action spaces.

    Subclasses implement ``reset`` and ``step`` with string observations and actions,
    calling ``super().reset(seed=seed)`` first (it seeds ``self.np_random``).
    """

    metadata: dict[str, Any] = {"render_modes": []}
    observation_space = gym.spaces.Text(max_length=MAX_TEXT, min_length=0, charset=TEXT_CHARSET)
    action_space = gym.spaces.Text(max_length=MAX_TEXT, min_length=0, charset=TEXT_CHARSET)


def make_text_env(env_id: str, kwargs: dict[str, Any] | None = None) -> gym.Env:
    """``gymnasium.make(env_id, **kwargs)`` with the project's ``envs`` registered first
    (``"module:id"`` imports ``module`` first, which registers its ids, as in gymnasium).

    Raises:
        TextEnvError: The id is not registered, the env cannot be made with ``kwargs``, or
            it is not a text environment (its observation space is not ``Text``).
    """
    import envs  # noqa: F401  (registers the rlft/* ids)

    if ":" in env_id:  # "my_pkg.envs:my/Env-v0": import the module that registers the id
        module, env_id = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise TextEnvError(f"env.id: cannot import {module!r}: {exc}") from None
    if env_id not in gym.registry:
        close = [
            k for k in gym.registry if k.split("/")[-1].lower() == env_id.split("/")[-1].lower()
        ]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TextEnvError(f"env.id={env_id!r} is not a registered gymnasium environment{hint}")
    try:
        env = gym.make(env_id, **(kwargs or {}))
    except Exception as exc:  # gymnasium raises several types: name the cause
        raise TextEnvError(
            f"env.id={env_id!r} with env.kwargs={kwargs} cannot be made: {exc}"
        ) from exc
    if not isinstance(env.observation_space, gym.spaces.Text):
        env.close()
        raise NotTextEnvError(
            f"env.id={env_id!r} is not a text environment: its observation space is "
            f"{env.observation_space} (an LM agent needs text observations; see rlft_ray.agents.TextEnv)"
        )
    return env


def is_text_env(env_id: str) -> bool:
    """Whether ``env_id`` makes a text environment (False for unknown or non-text ids)."""
    try:
        make_text_env(env_id).close()
    except TextEnvError:
        return False
    return True


def check_text_env(observation: Any, where: str) -> str:
    """``observation`` if it is text, else a :class:`TextEnvError` naming ``where``."""
    if not isinstance(observation, str):
        raise TextEnvError(
            f"{where} returned a {type(observation).__name__} observation; a text environment "
            "must return str observations"
        )
    return observation


class NotTextEnvError(TextEnvError):
    """A registered environment whose observations are not text."""


class StepTimeout(TimeoutError):
    """An environment step that did not return within ``env.step_timeout_s``."""


@dataclass
class StepOutcome:
    """What one ``env.step`` gave, or why it gave nothing.

    Attributes:
        result: ``(obs, reward, terminated, truncated, info)``; None on failure.
        error: Why the step failed (timed out, raised, broke the protocol); None if it did not.
        seconds: Wall time the step took (up to the timeout).
    """

    result: tuple[str, float, bool, bool, dict[str, Any]] | None
    error: str | None
    seconds: float


class _StepWorkers:
    """Daemon threads that run environment steps, kept across turns and batches.

    A turn of 64 episodes used to start 64 threads: under load that cost 10-40 ms a turn
    against 0.5 ms for the steps themselves (``benchmarks/agent_tools.py``'s throughput).
    Workers here wait on one queue; a call hands over its steps and starts new workers only
    where fewer are idle than it has steps (so every step of a call still runs at once and
    slow tools overlap). A worker stuck in a step that timed out stays busy forever and is
    simply not counted as idle: the next call starts a replacement.
    """

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def run(self, jobs: Sequence[Callable[[], None]]) -> None:
        """Start ``jobs``, each on its own worker (returns at once)."""
        with self._lock:
            spawn = max(0, len(jobs) - self._idle)
            self._idle += spawn
        for _ in range(spawn):
            threading.Thread(target=self._loop, daemon=True, name="env-step").start()
        for job in jobs:
            self._tasks.put(job)

    def _loop(self) -> None:
        while True:
            job = self._tasks.get()
            with self._lock:
                self._idle -= 1
            try:
                job()
            finally:
                with self._lock:
                    self._idle += 1


_WORKERS = _StepWorkers()


def step_with_timeout(
    envs: Sequence[gym.Env], actions: Sequence[str], timeout_s: float
) -> list[StepOutcome]:
    """Step every env with its action concurrently (each on its own daemon worker thread,
    so slow tools overlap; the workers are reused across calls), waiting at most
    ``timeout_s`` in all for each.

    A step that raises, returns a non-text observation, or does not return in time gives
    an outcome with ``error`` set: the caller ends that episode with the reason recorded.
    A timed-out step's thread is left behind (a Python thread cannot be killed); its env
    must not be used again (the sandboxed tool's own subprocess is killed by its limits).
    """
    outcomes: list[StepOutcome | None] = [None] * len(envs)
    starts = [0.0] * len(envs)
    finished = threading.Condition()
    remaining = [len(envs)]

    def work(i: int) -> None:
        try:
            obs, reward, terminated, truncated, info = envs[i].step(actions[i])
            check_text_env(obs, "env.step")
            outcome = StepOutcome(
                (obs, float(reward), bool(terminated), bool(truncated), dict(info)),
                None,
                time.perf_counter() - starts[i],
            )
        except Exception as exc:  # recorded as the episode's failure, not raised
            outcome = StepOutcome(
                None,
                f"env.step raised {type(exc).__name__}: {exc}",
                time.perf_counter() - starts[i],
            )
        with finished:
            outcomes[i] = outcome
            remaining[0] -= 1
            if remaining[0] == 0:
                finished.notify()

    now = time.perf_counter()
    starts[:] = [now] * len(envs)
    _WORKERS.run([functools.partial(work, i) for i in range(len(envs))])
    with finished:
        finished.wait_for(lambda: remaining[0] == 0, timeout=timeout_s)
        done = list(outcomes)  # a step finishing after the deadline changes nothing here
    return [
        out
        if out is not None
        else StepOutcome(
            None, f"env.step timed out after {timeout_s:g} s (env.step_timeout_s)", timeout_s
        )
        for out in done
    ]
