"""CartPole with its physics as keyword arguments: the changed-env fine-tuning task.

``gymnasium.make("rlft/CartPole-v1", gravity=15.0, length=0.8)`` is ``CartPole-v1``
(same spaces, rewards, termination and 500-step limit) with gravity, half pole length,
pole mass or push force changed, so a policy trained on the default CartPole can be
fine-tuned on another one.
"""

from __future__ import annotations

from typing import Any

from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class CartPoleVariantEnv(CartPoleEnv):
    """``CartPoleEnv`` with changeable physics.

    Args:
        gravity: m/s² (CartPole's default 9.8), > 0.
        length: Half the pole's length, m (default 0.5), > 0.
        masspole: Pole mass, kg (default 0.1), > 0.
        force_mag: Push force, N (default 10.0), > 0.
        **kwargs: ``CartPoleEnv``'s own (``render_mode``, ``sutton_barto_reward``).

    Raises:
        ValueError: A non-positive value, named.
    """

    def __init__(
        self,
        gravity: float = 9.8,
        length: float = 0.5,
        masspole: float = 0.1,
        force_mag: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (
            ("gravity", gravity),
            ("length", length),
            ("masspole", masspole),
            ("force_mag", force_mag),
        ):
            if not float(value) > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.gravity = float(gravity)
        self.length = float(length)
        self.masspole = float(masspole)
        self.force_mag = float(force_mag)
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length
