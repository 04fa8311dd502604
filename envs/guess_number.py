"""``rlft/GuessNumber-v0``: find a secret number from "higher" / "lower" feedback; the
fewer turns, the higher the reward.

An episode (``high=16``)::

    obs    "1-16?"              reset: the range
    model  "8"                  a guess
    obs    " higher 9-16?"      feedback (and the range still open)
    model  "12"                 ...
    obs    " lower 9-11?"
    model  "10"                 right: reward 1 - (turns - 1) / max_turns = 1 - 2/8 = 0.75

A guess that is not a whole number is a recorded zero-reward turn (reply ``" ?"``).
After ``max_turns`` wrong guesses the episode is truncated with return 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlft_ray.agents import TextEnv


class GuessNumberEnv(TextEnv):
    """Guess a secret in ``[1, high]``.

    Args:
        high: Largest secret.
        max_turns: Guesses before truncation (also the reward's turn scale).
        show_range: Feedback carries the range still open (``" higher 9-16?"``); False:
            only ``" higher"`` / ``" lower"`` (the model must remember its guesses).
    """

    def __init__(self, high: int = 16, max_turns: int = 8, show_range: bool = True) -> None:
        if high < 2 or max_turns < 1:
            raise ValueError(f"high >= 2 and max_turns >= 1 (got {high}, {max_turns})")
        self.high, self.max_turns, self.show_range = high, max_turns, show_range
        self.secret = self.turn = 0
        self.lo, self.hi = 1, high

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        self.secret = int(self.np_random.integers(1, self.high + 1))
        self.turn, self.lo, self.hi = 0, 1, self.high
        return f"1-{self.high}?", {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.turn += 1
        truncated = self.turn >= self.max_turns
        text = action.strip()
        if not text.isdigit():
            return " ?", 0.0, False, truncated, {"invalid": True}
        guess = int(text)
        if guess == self.secret:
            reward = 1.0 - (self.turn - 1) / self.max_turns
            return "", reward, True, False, {"is_success": True, "turns": self.turn}
        if guess < self.secret:
            word, self.lo = "higher", max(self.lo, guess + 1)
        else:
            word, self.hi = "lower", min(self.hi, guess - 1)
        reply = f" {word} {self.lo}-{self.hi}?" if self.show_range else f" {word}"
        return reply, 0.0, False, truncated, {}


def demonstrations(
    n: int, seed: int = 0, high: int = 16, max_turns: int = 8, informed_frac: float = 0.5
) -> list[dict[str, Any]]:
    """``n`` episodes of a weak strategy for a supervised pass (``segments`` rows); seeds
    ``seed + 10_000_000 + i``.

    An ``informed_frac`` share of the episodes guesses uniformly over the range still open
    (expected turns ``2 (1 + 1/high) H_high - 3``: 4.18 for ``high=16``); the others guess
    uniformly over ``[1, high]`` each turn, ignoring the feedback (6.45 turns, 60 % of them
    truncated at 8). Bisection needs 3.375 turns on average for ``high=16``, so from a base
    that only imitated the in-range strategy no policy could cut the turns by more than
    19 %: the feedback-ignoring half leaves GRPO the room to find using the range (which
    the base has seen) and then to sharpen it towards bisection (which it has not).
    """
    env = GuessNumberEnv(high=high, max_turns=max_turns)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt, _ = env.reset(seed=seed + 10_000_000 + i)
        informed = rng.random() < informed_frac
        segments: list[tuple[str, bool]] = []
        while True:
            lo, hi = (env.lo, env.hi) if informed else (1, high)
            guess = str(int(rng.integers(lo, hi + 1)))
            reply, _, terminated, truncated, _ = env.step(guess)
            segments.append((guess, True))
            if terminated or truncated:
                break
            segments.append((reply, False))
        rows.append({"prompt": prompt, "segments": segments})
    return rows
