"""RL losses and estimators against hand-computed values; algorithms/ stays Ray-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rlft_ray.algorithms import (
    compute_gae,
    dqn_loss,
    dqn_targets,
    linear_schedule,
    normalize_advantages,
    polyak_update,
    ppo_policy_loss,
    ppo_value_loss,
)

ALGORITHMS_DIR = Path(__file__).resolve().parent.parent / "rlft_ray" / "algorithms"


def _gae_loop(rewards, values, term, trunc, boot, last_values, gamma, lam):
    """Explicit per-env, per-step GAE exactly as written in the docstring."""
    T, N = rewards.shape
    adv = torch.zeros(T, N)
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            done = bool(term[t, n]) or bool(trunc[t, n])
            r = float(rewards[t, n]) + (
                gamma * float(boot[t, n]) if trunc[t, n] and not term[t, n] else 0.0
            )
            next_v = float(last_values[n]) if t == T - 1 else float(values[t + 1, n])
            delta = r + (0.0 if done else gamma * next_v) - float(values[t, n])
            running = delta + (0.0 if done else gamma * lam * running)
            adv[t, n] = running
    return adv


def test_gae_matches_explicit_loop() -> None:
    g = torch.Generator().manual_seed(0)
    T, N = 7, 3
    rewards = torch.randn(T, N, generator=g)
    values = torch.randn(T, N, generator=g)
    term = torch.zeros(T, N, dtype=torch.bool)
    trunc = torch.zeros(T, N, dtype=torch.bool)
    term[2, 0] = True
    trunc[4, 1] = True
    term[6, 2] = True
    boot = torch.randn(T, N, generator=g) * trunc
    last_values = torch.randn(N, generator=g)
    adv, ret = compute_gae(rewards, values, term, trunc, boot, last_values, 0.97, 0.9)
    expected = _gae_loop(rewards, values, term, trunc, boot, last_values, 0.97, 0.9)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)


def test_gae_hand_values() -> None:
    # One env, two steps, lambda = 1, gamma = 0.5, no episode end:
    # delta_1 = 1 + 0.5 * 4 - 2 = 1 ; delta_0 = 1 + 0.5 * 2 - 1 = 1 ; A_0 = 1 + 0.5 * 1 = 1.5
    rewards = torch.tensor([[1.0], [1.0]])
    values = torch.tensor([[1.0], [2.0]])
    zeros = torch.zeros(2, 1)
    adv, ret = compute_gae(rewards, values, zeros, zeros, zeros, torch.tensor([4.0]), 0.5, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5], [1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.5], [3.0]]))
    # A time-limit cut bootstraps from V(final obs) = 10 instead of V(reset obs):
    trunc = torch.tensor([[1.0], [0.0]])
    boot = torch.tensor([[10.0], [0.0]])
    adv, _ = compute_gae(rewards, values, zeros, trunc, boot, torch.tensor([4.0]), 0.5, 1.0)
    assert adv[0, 0].item() == pytest.approx(1.0 + 0.5 * 10.0 - 1.0)


def test_ppo_policy_loss_ratio_one_is_minus_mean_advantage() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5])
    adv = torch.tensor([1.0, -2.0, 4.0])
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, 0.2)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["approx_kl"].item() == pytest.approx(0.0)
    assert stats["clip_frac"].item() == pytest.approx(0.0)


def test_ppo_policy_loss_at_clip_edges() -> None:
    old = torch.zeros(4)
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, -1, -1, +1
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = ppo_policy_loss(new, old, adv, 0.2)
    # per-sample max(-A r, -A clip(r)):  -1.2, 0.8, 1.5, -0.5
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 1.5 - 0.5) / 4)
    assert stats["clip_frac"].item() == pytest.approx(1.0)
    # approx_kl = mean((r - 1) - log r)
    r = torch.tensor([1.5, 0.5, 1.5, 0.5])
    assert stats["approx_kl"].item() == pytest.approx(((r - 1) - r.log()).mean().item())


def test_ppo_value_loss_clipped_and_unclipped() -> None:
    values = torch.tensor([2.0, 0.0])
    old = torch.tensor([1.0, 1.0])
    returns = torch.tensor([3.0, 1.0])
    # unclipped: 0.5 * mean((2-3)^2, (0-1)^2) = 0.5
    assert ppo_value_loss(values, old, returns, None).item() == pytest.approx(0.5)
    # clipped (eps 0.2): V_clip = 1.2, 0.8 -> (1.2-3)^2 = 3.24, (0.8-1)^2 = 0.04; max with 1, 1 -> 3.24, 1
    assert ppo_value_loss(values, old, returns, 0.2).item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)


def test_normalize_advantages() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    out = normalize_advantages(a)
    torch.testing.assert_close(out, (a - 2.0) / (a.std() + 1e-8))


def test_dqn_and_double_dqn_targets() -> None:
    rewards = torch.tensor([1.0, 0.5])
    terminated = torch.tensor([0.0, 1.0])
    next_q_target = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    next_q_online = torch.tensor([[2.0, 0.0], [0.0, 9.0]])
    # DQN: 1 + 0.9 * max(1, 3) = 3.7 ; terminal row: 0.5
    torch.testing.assert_close(
        dqn_targets(rewards, terminated, next_q_target, 0.9), torch.tensor([3.7, 0.5])
    )
    # Double DQN: online argmax is action 0 -> 1 + 0.9 * Q_target(s', 0) = 1.9
    torch.testing.assert_close(
        dqn_targets(rewards, terminated, next_q_target, 0.9, next_q_online),
        torch.tensor([1.9, 0.5]),
    )
    # Huber: |d| <= 1 -> 0.5 d^2, else |d| - 0.5
    assert dqn_loss(torch.tensor([0.0, 3.0]), torch.tensor([0.5, 0.0])).item() == pytest.approx(
        (0.125 + 2.5) / 2
    )


def test_polyak_and_hard_update() -> None:
    online, target = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
    polyak_update(target, online, 0.25)
    torch.testing.assert_close(target.weight, torch.full((1, 2), 0.25))
    polyak_update(target, online, 1.0)
    torch.testing.assert_close(target.weight, online.weight)


def test_linear_schedule() -> None:
    assert linear_schedule(1.0, 0.1, 10, 0) == 1.0
    assert linear_schedule(1.0, 0.1, 10, 5) == pytest.approx(0.55)
    assert linear_schedule(1.0, 0.1, 10, 50) == pytest.approx(0.1)


def test_algorithms_never_import_ray() -> None:
    for path in ALGORITHMS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "ray" or n.startswith("ray.") for n in names), (
                f"{path.name} imports ray"
            )
    code = "import sys, rlft_ray.algorithms; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
