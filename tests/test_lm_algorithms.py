"""Token-level LM RL algorithms (rlft_ray.algorithms.lm) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlft_ray.algorithms.lm import (
    aggregate_loss_parts,
    chunked_token_logps,
    group_advantages,
    kl_penalty,
    masked_gae,
    masked_mean,
    masked_sum,
    masked_whiten,
    ppo_token_policy_losses,
    ppo_token_value_losses,
    selective_log_softmax,
    token_rewards,
)

NAN = float("nan")


# The per-token losses reduced the way the learners reduce them: the token objective of
# GRPO / PPO (ppo_token_policy_losses, + kl_coef * kl_penalty in the loss, value losses
# as PPO's) aggregated by aggregate_loss_parts in the step engine, statistics as
# masked token means.
def aggregate_loss(loss_mat, mask, mode):
    num, den = aggregate_loss_parts(loss_mat, mask, mode)
    return num / den.clamp_min(1e-8)


def ppo_token_policy_loss(
    logprobs, old_logprobs, advantages, mask, clip_low, clip_high=None, agg="token-mean"
):
    losses, stats = ppo_token_policy_losses(logprobs, old_logprobs, advantages, clip_low, clip_high)
    return aggregate_loss(losses, mask, agg), {k: masked_mean(v, mask) for k, v in stats.items()}


def ppo_token_value_loss(values, old_values, returns, mask, clip_coef):
    return masked_mean(ppo_token_value_losses(values, old_values, returns, clip_coef), mask)


def kl_loss(logprobs, ref_logprobs, mask, kind="k3", agg="token-mean"):
    return aggregate_loss(kl_penalty(logprobs, ref_logprobs, kind), mask, agg)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=1e-5)


# Ragged right-padded mask used throughout: lengths 4, 2, 1.
RAGGED = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)


# ---------------------------------------------------------------- masked reductions


def test_masked_sum_mean_ignore_padding_even_nan():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, NAN, 100.0], [7.0, 100.0, 100.0, NAN]])
    close(masked_sum(x, RAGGED), 28.0)
    close(masked_mean(x, RAGGED), 4.0)  # 28 / 7
    close(masked_sum(x, RAGGED, dim=-1), [10.0, 11.0, 7.0])
    close(masked_mean(x, RAGGED, dim=-1), [2.5, 5.5, 7.0])
    close(masked_mean(x, RAGGED.float(), dim=0), [13.0 / 3, 4.0, 3.0, 4.0])
    # An all-padding row gives 0, not NaN.
    close(masked_mean(x, torch.zeros_like(RAGGED), dim=-1), [0.0, 0.0, 0.0])


def test_masked_whiten_unbiased_and_padding_zero():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, -50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Real values 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3.
    std = math.sqrt(5.0 / 3.0)
    z = [-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std]
    out = masked_whiten(x, mask, eps=0.0)
    close(out, [[z[0], z[1], z[2]], [z[3], 0.0, 0.0]])
    out = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    close(out, [[z[0] + 2.5, z[1] + 2.5, z[2] + 2.5], [z[3] + 2.5, 0.0, 0.0]])


# ---------------------------------------------------------------- KL estimators

LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.5]])
REF_LOGPROBS = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -2.0, -2.5]])
# log r = ref - logprobs = [[-0.5, 1.0, 0.0], [-0.1, 1.0, -1.0]]
K3 = [
    [0.6065306597 - 1 + 0.5, 2.7182818285 - 1 - 1, 0.0],
    [0.9048374180 - 1 + 0.1, 2.7182818285 - 1 - 1, 0.3678794412 - 1 + 1],
]


def test_kl_estimators_by_hand():
    close(kl_penalty(LOGPROBS, REF_LOGPROBS, "k1"), [[0.5, -1.0, 0.0], [0.1, -1.0, 1.0]])
    close(kl_penalty(LOGPROBS, REF_LOGPROBS, "k2"), [[0.125, 0.5, 0.0], [0.005, 0.5, 0.5]])
    close(kl_penalty(LOGPROBS, REF_LOGPROBS, "k3"), K3)
    close(kl_penalty(LOGPROBS, REF_LOGPROBS, "low_var_kl"), K3)


def test_kl_k3_nonnegative_and_zero_at_equality():
    lp = torch.randn(4, 7) * 3
    ref = torch.randn(4, 7) * 3
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    assert (kl_penalty(lp, ref, "k2") >= 0).all()
    for kind in ("k1", "k2", "k3"):
        close(kl_penalty(lp, lp.clone(), kind), torch.zeros(4, 7))


def test_kl_unknown_kind_raises():
    with pytest.raises(ValueError, match="'k4'"):
        kl_penalty(LOGPROBS, REF_LOGPROBS, "k4")


def test_kl_loss_masked_token_mean():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = (K3[0][0] + K3[0][1] + K3[1][0] + K3[1][1] + K3[1][2]) / 5
    close(kl_loss(LOGPROBS, REF_LOGPROBS, mask), expected)
    expected_seq = ((K3[0][0] + K3[0][1]) / 2 + (K3[1][0] + K3[1][1] + K3[1][2]) / 3) / 2
    close(kl_loss(LOGPROBS, REF_LOGPROBS, mask, agg="seq-mean-token-mean"), expected_seq)
    close(kl_loss(LOGPROBS, REF_LOGPROBS, mask, kind="k1"), (0.5 - 1.0 + 0.1 - 1.0 + 1.0) / 5)


# ---------------------------------------------------------------- aggregation

LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, NAN], [7.0, 100.0, 100.0, 100.0]])


def test_aggregate_token_mean():
    close(aggregate_loss(LOSS_MAT, RAGGED, "token-mean"), 28.0 / 7)


def test_aggregate_seq_mean_token_mean():
    close(aggregate_loss(LOSS_MAT, RAGGED, "seq-mean-token-mean"), (2.5 + 5.5 + 7.0) / 3)


def test_aggregate_seq_mean_token_sum():
    close(aggregate_loss(LOSS_MAT, RAGGED.float(), "seq-mean-token-sum"), (10.0 + 11.0 + 7.0) / 3)


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError, match="'mean'"):
        aggregate_loss(LOSS_MAT, RAGGED, "mean")


# ---------------------------------------------------------------- group advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_grpo_advantages_unbiased_std():
    # Group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3). Group 2 constant -> 0.
    a = 0.5 / math.sqrt(1.0 / 3.0)
    adv = group_advantages(REWARDS, 4, "grpo", eps=1e-12)
    close(adv, [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    adv_eps = group_advantages(REWARDS, 4, "grpo")  # default eps keeps the constant group at 0
    close(adv_eps[4:], torch.zeros(4))


def test_grpo_without_std_is_dr_grpo():
    adv = group_advantages(REWARDS, 4, "grpo", std_normalize=False)
    close(adv, [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])


def test_rloo_advantages():
    # r_i - mean of the other three: 1 - 1/3, 0 - 2/3; constant group -> 0.
    adv = group_advantages(REWARDS, 4, "rloo")
    close(adv, [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0, 0.0])


def test_reinforce_batch_mean_baseline():
    adv = group_advantages(REWARDS, 4, "reinforce")  # batch mean 10 / 8 = 1.25
    close(adv, [-0.25, -1.25, -1.25, -0.25, 0.75, 0.75, 0.75, 0.75])


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(REWARDS, 1, "rloo")
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(REWARDS, 3, "grpo")
    with pytest.raises(ValueError, match="'ppo'"):
        group_advantages(REWARDS, 4, "ppo")


def test_grpo_group_size_one_is_zero():
    close(group_advantages(torch.tensor([3.0, -1.0]), 1, "grpo"), [0.0, 0.0])


# ---------------------------------------------------------------- token rewards + GAE


def test_token_rewards_kl_shaping_and_last_token_score():
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.5, 9.0, 9.0], [1.0, 9.0, 9.0, 9.0]])
    out = token_rewards(scores, kl, RAGGED, kl_coef=0.1)
    close(
        out,
        [
            [-0.01, -0.02, -0.03, -0.04 + 1.0],
            [-0.05, 0.05 + 2.0, 0.0, 0.0],
            [-0.1 + 3.0, 0.0, 0.0, 0.0],
        ],
    )
    out = token_rewards(scores, None, RAGGED.float(), kl_coef=0.1)
    close(out, [[0.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    # A row with no real token gets nothing.
    empty = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(token_rewards(torch.tensor([5.0, 7.0]), None, empty, 0.0), [[0, 5.0, 0], [0, 0, 0]])


def _gae_reference(rewards, values, lengths, gamma, lam):
    """Explicit per-row backward loop over the real tokens only."""
    batch, length = rewards.shape
    adv = [[0.0] * length for _ in range(batch)]
    ret = [[0.0] * length for _ in range(batch)]
    for b in range(batch):
        n = lengths[b]
        gae = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            gae = delta + gamma * lam * gae
            adv[b][t] = gae
            ret[b][t] = gae + values[b, t].item()
    return torch.tensor(adv), torch.tensor(ret)


def test_masked_gae_matches_explicit_loop_on_ragged_batch():
    rewards = torch.randn(3, 4)
    values = torch.randn(3, 4)
    # Garbage in the padding must not leak into the real tokens.
    rewards[~RAGGED] = 50.0
    values[~RAGGED] = -50.0
    adv, ret = masked_gae(rewards, values, RAGGED, gamma=0.9, lam=0.8)
    exp_adv, exp_ret = _gae_reference(rewards, values, [4, 2, 1], 0.9, 0.8)
    close(adv, exp_adv, atol=1e-5)
    close(ret, exp_ret, atol=1e-5)
    assert (adv[~RAGGED] == 0).all() and (ret[~RAGGED] == 0).all()


def test_masked_gae_by_hand_two_tokens():
    # r = [0, 1], V = [0.5, 0.2], gamma 0.9, lam 0.8:
    # delta_1 = 1 - 0.2 = 0.8; A_1 = 0.8
    # delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.72 * 0.8 = 0.256
    adv, ret = masked_gae(
        torch.tensor([[0.0, 1.0, 7.0]]),
        torch.tensor([[0.5, 0.2, 3.0]]),
        torch.tensor([[1, 1, 0]]),
        gamma=0.9,
        lam=0.8,
    )
    close(adv, [[0.256, 0.8, 0.0]])
    close(ret, [[0.756, 1.0, 0.0]])


def test_masked_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, 0.2, 0.3, 1.0], [-0.5, 2.0, 9.0, 9.0], [3.0, 9.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2], [1.0, 1.5, 9.0, 9.0], [2.0, 9.0, 9.0, 9.0]])
    adv, ret = masked_gae(rewards, values, RAGGED, gamma=1.0, lam=1.0)
    reward_to_go = torch.tensor([[1.6, 1.5, 1.3, 1.0], [1.5, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    close(adv, (reward_to_go - values) * RAGGED)
    close(ret, reward_to_go)


# ---------------------------------------------------------------- PPO token losses


def test_policy_loss_ratio_one_is_minus_token_mean_advantage():
    logprobs = torch.randn(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 4.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = ppo_token_policy_loss(logprobs, logprobs.clone(), adv, mask, 0.2)
    close(loss, -9.0 / 5)
    close(stats["approx_kl"], 0.0)
    close(stats["clip_frac"], 0.0)
    # Sequence-level advantages broadcast over tokens: -(2 * 3 - 1 * 2) / 5.
    loss, _ = ppo_token_policy_loss(
        logprobs, logprobs.clone(), torch.tensor([2.0, -1.0]), mask, 0.2
    )
    close(loss, -4.0 / 5)
    loss, _ = ppo_token_policy_loss(
        logprobs, logprobs.clone(), torch.tensor([2.0, -1.0]), mask, 0.2, agg="seq-mean-token-sum"
    )
    close(loss, -(6.0 - 2.0) / 2)


# ratio, advantage, expected per-token loss at clip 0.2 (symmetric):
#   1.5, +1 -> max(-1.5, -1.2) = -1.2   (clipped)
#   0.5, -1 -> max( 0.5,  0.8) =  0.8   (clipped)
#   1.5, -1 -> max( 1.5,  1.2) =  1.5   (ratio outside the range, but not clipped)
#   0.5, +1 -> max(-0.5, -0.8) = -0.5   (ratio outside the range, but not clipped)
#   1.0, +1 -> -1.0
#   1.1, +1 -> -1.1
RATIOS = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.0, 1.1, 3.0]])
ADVS = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]])
MASK7 = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])  # last token (ratio 3) is padding


def test_policy_loss_at_clip_edges():
    old = torch.zeros(1, 2)
    loss, _ = ppo_token_policy_loss(RATIOS[:, :1].log(), old[:, :1], ADVS[:, :1], MASK7[:, :1], 0.2)
    close(loss, -1.2)
    loss, _ = ppo_token_policy_loss(
        RATIOS[:, 1:2].log(), old[:, :1], ADVS[:, 1:2], MASK7[:, :1], 0.2
    )
    close(loss, 0.8)
    old = torch.full((1, 7), -0.3)
    loss, stats = ppo_token_policy_loss(RATIOS.log() + old, old, ADVS, MASK7, 0.2)
    close(loss, (-1.2 + 0.8 + 1.5 - 0.5 - 1.0 - 1.1) / 6)
    close(stats["clip_frac"], 4.0 / 6)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.5, 0.5, 1.0, 1.1)]
    close(stats["approx_kl"], sum(k3) / 6)


def test_policy_loss_clip_higher_asymmetric():
    ratios = torch.tensor([[1.5, 1.25, 0.5, 0.75]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    # eps_low 0.2, eps_high 0.28: range [0.8, 1.28].
    #   1.5, +1 -> -1.28; 1.25, +1 -> -1.25 (inside); 0.5, -1 -> 0.8; 0.75, -1 -> 0.8
    loss, stats = ppo_token_policy_loss(ratios.log(), old, adv, mask, 0.2, clip_high=0.28)
    close(loss, (-1.28 - 1.25 + 0.8 + 0.8) / 4)
    close(stats["clip_frac"], 3.0 / 4)
    # Symmetric 0.2 clips 1.25 at 1.2 as well.
    loss, stats = ppo_token_policy_loss(ratios.log(), old, adv, mask, 0.2)
    close(loss, (-1.2 - 1.2 + 0.8 + 0.8) / 4)
    close(stats["clip_frac"], 1.0)


def test_policy_loss_gradient_zero_on_clipped_tokens():
    old = torch.zeros(1, 7)
    logprobs = RATIOS.log().clone().requires_grad_(True)
    loss, _ = ppo_token_policy_loss(logprobs, old, ADVS, MASK7, 0.2)
    loss.backward()
    # d/dlogp of -A * rho is -A * rho; clipped tokens (0, 1) and padding (6) get 0.
    expected = torch.tensor([[0.0, 0.0, 1.5, -0.5, -1.0, -1.1, 0.0]]) / 6
    close(logprobs.grad, expected)


def test_value_loss_clipped_and_unclipped():
    values = torch.tensor([[1.0, 2.0], [0.0, 100.0]])
    old_values = torch.tensor([[0.5, 2.0], [0.0, -100.0]])
    returns = torch.tensor([[2.0, 1.0], [1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # Token 0: max((1 - 2)^2, (0.7 - 2)^2) = 1.69; tokens 1, 2: 1.
    close(ppo_token_value_loss(values, old_values, returns, mask, 0.2), 0.5 * 3.69 / 3)
    close(ppo_token_value_loss(values, old_values, returns, mask, None), 0.5 * 3.0 / 3)


# ---------------------------------------------------------------- log-probs


def test_selective_log_softmax_by_hand_and_bf16():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[2, 1]])
    lse = 3.0 + math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))  # 3.4076059644
    out = selective_log_softmax(logits, tokens)
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    close(out, [[3.0 - lse, -math.log(3.0)]])

    logits = torch.randn(2, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5))
    out = selective_log_softmax(logits, tokens)
    ref = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(out, ref.detach())
    out.sum().backward()
    assert logits.grad is not None

    low = logits.detach().bfloat16()
    out16 = selective_log_softmax(low, tokens)
    assert out16.dtype == torch.float32
    close(out16, selective_log_softmax(low.float(), tokens))


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_token_logps_equals_the_full_log_softmax_with_its_gradients(chunk):
    """Chunks of the output head give the full log-softmax's log-probs, entropies and
    gradients (hidden states and head weights), whatever the chunk size."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    logits = (hidden @ weight.T + bias) / 0.7
    full_logp = torch.log_softmax(logits, -1)
    want = full_logp.gather(-1, tokens[..., None])[..., 0]
    want_ent = -(full_logp.exp() * full_logp).sum(-1)
    (want * torch.arange(10.0).view(2, 5)).sum().backward()
    want_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    got, ent = chunked_token_logps(hidden, weight, bias, tokens, 0.7, chunk, entropy=True)
    close(got, want.detach(), atol=1e-5)
    close(ent, want_ent.detach(), atol=1e-5)
    assert not ent.requires_grad
    (got * torch.arange(10.0).view(2, 5)).sum().backward()
    close(hidden.grad, want_grads[0], atol=1e-5)
    close(weight.grad, want_grads[1], atol=1e-5)
    # without entropy: zeros, and no gradient needed: no checkpointing either
    with torch.no_grad():
        got, ent = chunked_token_logps(hidden, weight, None, tokens, 1.0, chunk)
    close(got, torch.log_softmax(hidden @ weight.T, -1).gather(-1, tokens[..., None])[..., 0])
    assert float(ent.abs().sum()) == 0.0
