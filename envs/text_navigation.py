"""``rlft/TextNavigation-v0``: the 2-D navigation task (``rlft/Navigation-v0``) as text on
a grid: the model reads its position and the goal and answers with moves, a few per turn.

An episode (``size=5``, ``max_moves=2``)::

    obs    "goal 3,0 at 1,2>"     reset: goal and position (x, y in 0..size-1)
    model  "rr"                    moves: r(ight) l(eft) u(p, y+1) d(own, y-1)
    obs    " at 3,2>"              reward -0.1 (a step's cost)
    model  "dd"
    obs    ""                      at the goal: reward 1, terminated

Each turn costs ``step_cost``; reaching the goal gives 1 instead (so the return is
1 - 0.1 x the turns before the last one). A turn that is not 1..``max_moves`` moves from
``udlr`` moves nothing (a recorded invalid turn, with the same cost). Moves stop at the
grid's edges. After ``max_turns`` turns the episode is truncated.
"""

from __future__ import annotations

from typing import Any

from rlft_ray.agents import TextEnv

_MOVES = {"r": (1, 0), "l": (-1, 0), "u": (0, 1), "d": (0, -1)}


class TextNavigationEnv(TextEnv):
    """Walk a grid to the goal in text.

    Args:
        size: Grid side (positions 0..size-1).
        max_moves: Most moves in one turn.
        max_turns: Turns before truncation.
        step_cost: Reward of a turn that does not reach the goal (negative).
    """

    def __init__(
        self, size: int = 5, max_moves: int = 2, max_turns: int = 8, step_cost: float = -0.1
    ) -> None:
        if size < 2 or max_moves < 1 or max_turns < 1:
            raise ValueError(
                f"size >= 2, max_moves >= 1, max_turns >= 1 (got {size}, {max_moves}, {max_turns})"
            )
        self.size, self.max_moves, self.max_turns, self.step_cost = (
            size,
            max_moves,
            max_turns,
            step_cost,
        )
        self.pos = self.goal = (0, 0)
        self.turn = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        while True:
            x, y, gx, gy = (int(v) for v in self.np_random.integers(0, self.size, size=4))
            if (x, y) != (gx, gy):
                break
        self.pos, self.goal, self.turn = (x, y), (gx, gy), 0
        return f"goal {gx},{gy} at {x},{y}>", {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.turn += 1
        moves = action.strip()
        info: dict[str, Any] = {}
        if 1 <= len(moves) <= self.max_moves and all(m in _MOVES for m in moves):
            x, y = self.pos
            for m in moves:
                dx, dy = _MOVES[m]
                x, y = min(max(x + dx, 0), self.size - 1), min(max(y + dy, 0), self.size - 1)
            self.pos = (x, y)
        else:
            info["invalid"] = True
        if self.pos == self.goal:
            return "", 1.0, True, False, {**info, "is_success": True}
        x, y = self.pos
        return f" at {x},{y}>", self.step_cost, False, self.turn >= self.max_turns, info
