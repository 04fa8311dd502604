"""A 2-D point-navigation task on the square ``[-1, 1]²``.

The agent is a point at position :math:`p_t = (x_t, y_t)` that has to reach a fixed
goal :math:`g = (g_x, g_y)`. Each step moves it by at most ``max_step`` per axis, and
the reward is the negative Euclidean distance to the goal after the move, so the
return is maximised by walking straight at the goal. The episode terminates once the
agent is within ``goal_radius`` of the goal; the time limit (50 steps) comes from the
``TimeLimit`` wrapper that ``gymnasium.make("rlft/Navigation-v0")`` adds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any, ClassVar

import gymnasium
import numpy as np
from gymnasium import spaces
from numpy.typing import NDArray

ACTION_TYPES: tuple[str, ...] = ("continuous", "discrete")
"""Accepted values of the ``action_type`` kwarg."""

NUM_DIRECTIONS: int = 8
"""Number of discrete actions (compass directions at 45° steps)."""

_ANGLES = np.arange(NUM_DIRECTIONS, dtype=np.float64) * (2.0 * math.pi / NUM_DIRECTIONS)
DISCRETE_DIRECTIONS: NDArray[np.float64] = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)
"""Unit vectors of the discrete actions: row ``k`` is ``(cos(k·45°), sin(k·45°))``.

Action 0 is east ``(1, 0)``, 2 is north ``(0, 1)``, 4 is west, 6 is south, and the odd
actions are the diagonals in between (counter-clockwise order).
"""
DISCRETE_DIRECTIONS.setflags(write=False)

RENDER_SIZE: int = 64
"""Side length in pixels of the ``rgb_array`` frames."""

_BACKGROUND = np.array([245, 245, 245], dtype=np.uint8)
_GOAL_COLOR = np.array([60, 170, 75], dtype=np.uint8)
_AGENT_COLOR = np.array([215, 50, 40], dtype=np.uint8)
_AGENT_PIXEL_RADIUS = 2.0


def _check_real(name: str, value: Any) -> float:
    """Return ``value`` as a finite float, or raise a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (Real, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _check_point(name: str, value: Any) -> NDArray[np.float64]:
    """Validate a point of ``[-1, 1]²`` given as 2 numbers and return it as float64."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be a sequence of 2 numbers, got {value!r}")
    if len(value) != 2:
        raise ValueError(f"{name} must have exactly 2 coordinates, got {len(value)}: {value!r}")
    point = np.array([_check_real(name, v) for v in value], dtype=np.float64)
    if np.any(np.abs(point) > 1.0):
        raise ValueError(f"{name} must lie inside [-1, 1]², got {tuple(point.tolist())}")
    return point


class NavigationEnv(gymnasium.Env[NDArray[np.float32], Any]):
    r"""Move a point on ``[-1, 1]²`` to a fixed goal.

    **Observation** — ``Box(-1, 1, shape=(4,), float32)``:
    ``[x, y, goal_x, goal_y]`` (agent position, then goal position).

    **Actions** — the move :math:`\Delta_t` applied at step :math:`t`:

    * ``action_type="continuous"``: ``Box(-1, 1, shape=(2,), float32)``; the action
      :math:`a` is clipped to ``[-1, 1]²`` and scaled,
      :math:`\Delta_t = \text{max\_step} \cdot \text{clip}(a, -1, 1)` (so each axis moves
      at most ``max_step``).
    * ``action_type="discrete"``: ``Discrete(8)``; action :math:`k` moves ``max_step``
      in the direction at angle :math:`k \cdot 45°` counter-clockwise from east,
      :math:`\Delta_t = \text{max\_step} \cdot (\cos(k\pi/4), \sin(k\pi/4))`.

    **Dynamics, reward and termination**:

    .. math::

        p_{t+1} = \text{clip}(p_t + \Delta_t, -1, 1), \qquad
        d_{t+1} = \lVert p_{t+1} - g \rVert_2, \qquad
        r_{t+1} = -d_{t+1}

    The episode terminates when :math:`d_{t+1} < \text{goal\_radius}`. The env itself
    never truncates; ``gymnasium.make("rlft/Navigation-v0")`` wraps it in a
    ``TimeLimit`` of 50 steps. ``info`` carries ``"distance"`` (:math:`d`) and
    ``"is_success"`` (``True`` exactly when the step terminated).

    **Start state**: :math:`p_0 \sim \mathcal{U}([-1, 1]^2)`, resampled while
    :math:`\lVert p_0 - g \rVert_2 < \text{goal\_radius}`. ``reset(options={"start":
    (x, y)})`` places the agent at a given point instead (useful for tests and
    evaluation).

    The position is kept in float64; observations are its float32 copy, so a reward
    recomputed from an observation can differ from the returned one by ~1e-7.

    Args:
        goal: Goal position :math:`g`, 2 numbers inside ``[-1, 1]²``.
        action_type: ``"continuous"`` or ``"discrete"``.
        max_step: Largest move per axis and step (the length of a discrete move), > 0.
        goal_radius: Success radius around the goal, in ``(0, 1]`` (the bound keeps the
            rejection sampling of the start position cheap and always possible).
        render_mode: ``None`` or ``"rgb_array"`` (64 x 64 x 3 uint8 frames).

    Raises:
        ValueError: If a kwarg is invalid; the message names the kwarg.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        goal: tuple[float, float] | list[float] = (0.5, 0.5),
        action_type: str = "continuous",
        max_step: float = 0.1,
        goal_radius: float = 0.1,
        render_mode: str | None = None,
    ) -> None:
        self.goal: NDArray[np.float64] = _check_point("goal", goal)
        self.goal.setflags(write=False)
        if action_type not in ACTION_TYPES:
            raise ValueError(
                f"action_type must be one of {list(ACTION_TYPES)}, got {action_type!r}"
            )
        self.action_type: str = action_type
        self.max_step: float = _check_real("max_step", max_step)
        if self.max_step <= 0:
            raise ValueError(f"max_step must be > 0, got {max_step!r}")
        self.goal_radius: float = _check_real("goal_radius", goal_radius)
        if not 0 < self.goal_radius <= 1:
            raise ValueError(f"goal_radius must be in (0, 1], got {goal_radius!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}"
            )
        self.render_mode: str | None = render_mode

        self.observation_space: spaces.Box = spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self.action_space: spaces.Space[Any]
        if action_type == "continuous":
            self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        else:
            self.action_space = spaces.Discrete(NUM_DIRECTIONS)

        self._position: NDArray[np.float64] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def position(self) -> NDArray[np.float64]:
        """A copy of the agent position :math:`p_t` (float64).

        Raises:
            RuntimeError: If called before :meth:`reset`.
        """
        if self._position is None:
            raise RuntimeError("NavigationEnv: call reset() before reading the position")
        return self._position.copy()

    # ------------------------------------------------------------------ gym API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        r"""Start an episode.

        The start :math:`p_0` is drawn from ``self.np_random`` uniformly on
        ``[-1, 1]²`` and redrawn while :math:`\lVert p_0 - g \rVert_2 <` ``goal_radius``.

        Args:
            seed: Re-seeds ``self.np_random`` when given.
            options: Optional ``{"start": (x, y)}`` to place the agent at a given point
                of ``[-1, 1]²`` instead of sampling it (it may lie inside the goal
                radius). Other keys raise.

        Returns:
            ``(observation, info)`` with ``info = {"distance": d_0, "is_success": False}``.

        Raises:
            ValueError: If ``options`` has unknown keys or an invalid ``start``.
        """
        super().reset(seed=seed)
        options = dict(options or {})
        start = options.pop("start", None)
        if options:
            raise ValueError(f"options: unknown keys {sorted(options)}; only 'start' is accepted")
        if start is not None:
            position = _check_point("options['start']", start)
        else:
            while True:
                position = self.np_random.uniform(-1.0, 1.0, size=2)
                if np.linalg.norm(position - self.goal) >= self.goal_radius:
                    break
        self._position = position
        info = {"distance": self._distance(), "is_success": False}
        return self._observation(), info

    def step(self, action: Any) -> tuple[NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        r"""Move the agent by the action's step and score the new position.

        Args:
            action: A ``(2,)`` array-like (continuous) or an integer in ``[0, 8)``
                (discrete); see the class docstring for the mapping to a move.

        Returns:
            ``(observation, reward, terminated, truncated, info)`` with
            ``reward = -d``, ``terminated = d < goal_radius``, ``truncated = False`` and
            ``info = {"distance": d, "is_success": terminated}``, where ``d`` is the
            distance from the new position to the goal.

        Raises:
            RuntimeError: If called before :meth:`reset`.
            ValueError: If the action does not fit the action space (wrong shape, not
                finite, or a discrete index out of range).
        """
        if self._position is None:
            raise RuntimeError("NavigationEnv: call reset() before step()")
        move = self._move(action)
        self._position = np.clip(self._position + move, -1.0, 1.0)
        distance = self._distance()
        terminated = bool(distance < self.goal_radius)
        info = {"distance": distance, "is_success": terminated}
        return self._observation(), -distance, terminated, False, info

    def render(self) -> NDArray[np.uint8] | None:
        """Draw the goal (green disk of radius ``goal_radius``) and the agent (red dot).

        Returns:
            A ``(64, 64, 3)`` uint8 frame for ``render_mode="rgb_array"`` (``+y`` points
            up), else ``None``. Before the first :meth:`reset` only the goal is drawn.
        """
        if self.render_mode != "rgb_array":
            return None
        scale = (RENDER_SIZE - 1) / 2.0
        rows, cols = np.mgrid[0:RENDER_SIZE, 0:RENDER_SIZE].astype(np.float64)
        frame = np.empty((RENDER_SIZE, RENDER_SIZE, 3), dtype=np.uint8)
        frame[...] = _BACKGROUND

        def disk(center: NDArray[np.float64], radius_px: float) -> NDArray[np.bool_]:
            col = (center[0] + 1.0) * scale
            row = (1.0 - center[1]) * scale
            return (rows - row) ** 2 + (cols - col) ** 2 <= radius_px**2

        frame[disk(self.goal, max(self.goal_radius * scale, 1.0))] = _GOAL_COLOR
        if self._position is not None:
            frame[disk(self._position, _AGENT_PIXEL_RADIUS)] = _AGENT_COLOR
        return frame

    # ------------------------------------------------------------------ helpers

    def _move(self, action: Any) -> NDArray[np.float64]:
        """Map an action to the displacement :math:`\\Delta_t` (before position clipping)."""
        if self.action_type == "discrete":
            if not self.action_space.contains(action):
                raise ValueError(
                    f"action must be an integer in [0, {NUM_DIRECTIONS}), got {action!r}"
                )
            return self.max_step * DISCRETE_DIRECTIONS[int(action)]
        try:
            arr = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"action must be a numeric array of shape (2,), got {action!r}"
            ) from err
        if arr.shape != (2,):
            raise ValueError(f"action must have shape (2,), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"action must be finite, got {action!r}")
        return self.max_step * np.clip(arr, -1.0, 1.0)

    def _distance(self) -> float:
        """Euclidean distance :math:`\\lVert p_t - g \\rVert_2` as a Python float."""
        assert self._position is not None
        return float(np.linalg.norm(self._position - self.goal))

    def _observation(self) -> NDArray[np.float32]:
        """A fresh ``[x, y, goal_x, goal_y]`` float32 array."""
        assert self._position is not None
        return np.concatenate([self._position, self.goal]).astype(np.float32)
