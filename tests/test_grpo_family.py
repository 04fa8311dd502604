"""The GRPO family's variants: GSPO, DAPO (overlong shaping, dynamic sampling), Dr. GRPO,
REINFORCE++ and pass@k / maj@k, against hand-computed values; their learner updates."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlft_ray.algorithms import aggregate_loss_parts
from rlft_ray.algorithms.pass_at_k import (
    answer_ids,
    k_values,
    maj_at_k,
    mean_pass_at_k,
    pass_at_k,
)
from rlft_ray.algorithms.policy_gradient import (
    gspo_sequence_policy_losses,
    informative_groups,
    overlong_reward_penalty,
    reinforce_pp_advantages,
)
from rlft_ray.config import ConfigError, build_config
from rlft_ray.learners.lm_learner import heldout_lm_metrics
from rlft_ray.rollout.dynamic_sampling import fill_batch
from rlft_ray.types import GenerationBatch

from lm_helpers import GROUP, make_batch, make_learner

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# --------------------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_and_clipping_hand_values() -> None:
    # row 0: log-ratios 0.5, 0.5 (padding ignored) -> s = e^0.5 = 1.6487 > 1.2, A = 1: clipped
    # row 1: ratio 1, A = -2 -> loss 2 on each of its 3 tokens
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.5, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = gspo_sequence_policy_losses(logprobs, old, adv, mask, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2, 0.0], [2.0, 2.0, 2.0]]))
    assert stats["clip_frac"][0, 0] == 1.0 and stats["clip_frac"][1, 0] == 0.0
    torch.testing.assert_close(stats["approx_kl"][0, 0], torch.tensor(math.exp(0.5) - 1.5))
    # seq-mean-token-mean gives the paper's (1/G) sum_i l_i
    num, den = aggregate_loss_parts(loss, mask, "seq-mean-token-mean")
    assert float((num / den).detach()) == pytest.approx((-1.2 + 2.0) / 2)
    # gradient: the clipped row none; row 1: d(-A s)/d logp_t = -A * s / |y| = 2/3 per token
    (num / den).backward()
    torch.testing.assert_close(
        logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    )  # (2/3) / G=2 rows


# --------------------------------------------------------------------------- DAPO


def test_overlong_penalty_is_dapo_eq13() -> None:
    lengths = torch.tensor([3, 4, 5, 6, 8, 9])
    torch.testing.assert_close(
        overlong_reward_penalty(lengths, max_tokens=8, buffer=4),
        torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]),
    )
    torch.testing.assert_close(
        overlong_reward_penalty(lengths, 8, 4, penalty=0.5),
        torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]),
    )
    with pytest.raises(ValueError, match="buffer"):
        overlong_reward_penalty(lengths, 8, 9)


def test_informative_groups() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.3, 0.2])
    assert informative_groups(rewards, 2).tolist() == [False, True, False, True]


def _batch(rewards: list[float], group: int = 2, tag: int = 0) -> GenerationBatch:
    n = len(rewards)
    return GenerationBatch(
        prompt_ids=np.ones((n, 2), dtype=np.int64),
        prompt_mask=np.ones((n, 2), dtype=bool),
        response_ids=np.ones((n, 3), dtype=np.int64),
        response_mask=np.ones((n, 3), dtype=bool),
        logprobs=np.zeros((n, 3), dtype=np.float32),
        rewards=np.asarray(rewards, dtype=np.float32),
        group_ids=np.repeat(np.arange(n // group), group),
        prompts=[f"{tag}-{i // group}" for i in range(n)],
        completions=["x"] * n,
        metadata=[{}] * n,
        policy_version=tag,
        group_size=group,
        pad_token_id=0,
    )


def test_dynamic_sampling_fills_the_batch_with_informative_groups() -> None:
    first = _batch([1, 1, 0, 1, 0, 0, 1, 0], tag=0)  # groups: flat, ok, flat, ok
    more = iter([_batch([0, 0, 1, 1, 0, 0, 0, 0], tag=1), _batch([1, 0, 0, 1, 1, 0, 0, 1], tag=2)])
    out = fill_batch(first, lambda: next(more), max_rounds=4)
    # 2 from the first batch, none from the second (all flat), 2 of the third's 4
    assert len(out) == 8 and out.resample_rounds == 2 and out.extra_samples == 16
    assert out.filtered_groups == 2 + 4 + 0
    assert sorted(set(out.prompts)) == ["0-1", "0-3", "2-0", "2-1"]
    assert informative_groups(torch.as_tensor(out.rewards), 2).all()
    assert out.num_steps == 24 and out.selection.num_accepted == 8  # env steps: all generated
    assert len(out.episodes.returns) == 24
    assert out.policy_version == 0  # the oldest sampler


def test_dynamic_sampling_is_bounded_and_never_empty() -> None:
    flat = [1.0, 1.0, 0.0, 0.0]
    calls = []

    def more() -> GenerationBatch:
        calls.append(1)
        return _batch(flat, tag=len(calls))

    short = fill_batch(_batch([1, 0, 0, 0]), more, max_rounds=2)
    assert len(calls) == 2 and len(short) == 2 and short.filtered_groups == 1 + 2 + 2
    calls.clear()
    none = fill_batch(_batch(flat), more, max_rounds=1)
    assert len(calls) == 1 and len(none) == 4 and none.prompts[0] == "0-0"  # the first batch


def test_the_loop_refills_from_the_next_prompts_with_the_current_version() -> None:
    from rlft_ray.run import loop

    class Runners:
        mine = [0, 1]

        def __init__(self) -> None:
            self.calls: list[tuple[int, list]] = []

        def sample(self, weights_for_recovery, per_actor, version):
            self.calls.append((version, per_actor))
            half = [1.0, 0.0] if len(self.calls) == 1 else [1.0, 1.0]
            return [_batch(half, tag=version), _batch([0.0, 0.0], tag=version)]

    class Learner:
        taken = 0

        def policy_state(self) -> dict:
            return {}

        def next_sample_args(self, num_actors: int) -> list[tuple]:
            self.taken += 1
            return [(f"prompts {self.taken}.{i}",) for i in range(num_actors)]

    runners = Runners()
    out = loop._fill(Learner(), runners, _batch([0, 0, 1, 1]), version=7, rounds=3)
    # 2 groups wanted: the first batch has none, round 1 one, rounds 2 and 3 none: bounded
    assert [v for v, _ in runners.calls] == [7, 7, 7]  # sampled with the current weights
    assert runners.calls[0][1] == [("prompts 1.0",), ("prompts 1.1",)]  # the next prompts
    assert len(out) == 2 and out.resample_rounds == 3 and out.extra_samples == 12
    assert out.policy_version == 7


# --------------------------------------------------------------------------- Dr. GRPO


def test_dr_grpo_constant_normaliser() -> None:
    loss = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    num, den = aggregate_loss_parts(loss, mask, "seq-mean-token-sum-norm", max_tokens=4)
    assert (num.item(), den.item()) == (6.0, 8.0)  # sum over B * L_max
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate_loss_parts(loss, mask, "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------- REINFORCE++


def _whiten(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


def test_reinforce_pp_returns_with_token_kl_whitened_globally() -> None:
    scores = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    kl = torch.tensor([[0.5, 0.5], [1.0, 7.0]])  # 7.0 sits on padding
    adv = reinforce_pp_advantages(scores, mask, kl, 0.1, group_size=2, baseline=False)
    # rewards: row 0 [-0.05, -0.05 + 1], row 1 [-0.1]; returns: [0.9, 0.95], [-0.1]
    a, b, c = _whiten([0.9, 0.95, -0.1])
    torch.testing.assert_close(adv, torch.tensor([[a, b], [c, 0.0]]))
    # baseline: each group's mean reward off first (scores 1, 0 -> 0.5, -0.5); no KL
    adv = reinforce_pp_advantages(scores, mask, None, 0.1, group_size=2, baseline=True)
    a, b, c = _whiten([0.5, 0.5, -0.5])
    torch.testing.assert_close(adv, torch.tensor([[a, b], [c, 0.0]]))
    # the moments go through `reduce` (a sum over ranks): two ranks holding this batch
    # whiten over all six tokens
    twice = reinforce_pp_advantages(
        scores, mask, None, 0.1, 2, baseline=True, reduce=lambda m: 2 * m
    )
    a, b, c = _whiten([0.5, 0.5, -0.5] * 2)[:3]
    torch.testing.assert_close(twice, torch.tensor([[a, b], [c, 0.0]]))


# --------------------------------------------------------------------------- pass@k / maj@k


def test_pass_at_k_matches_brute_force() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2) / C(5,2)
    for n, c, k in [(5, 2, 2), (6, 1, 3), (8, 3, 4), (4, 0, 2), (4, 4, 1), (7, 5, 3)]:
        right = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(right[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute), (n, c, k)
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=bool)
    assert mean_pass_at_k(correct, 1) == pytest.approx((0.25 + 0.5) / 2)
    assert mean_pass_at_k(correct, 4) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(3, 1, 4)


def test_maj_at_k_hand_values() -> None:
    answers = [["a", "a", "b", "c"], ["x", "y", "y", "y"]]
    correct = np.array([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=bool)
    # k=2: p0 blocks (a,a) right, (b,c) tie -> b wrong; p1 (x,y) tie -> x wrong, (y,y) right
    assert maj_at_k(answers, correct, 2) == 0.5
    assert maj_at_k(answers, correct, 4) == 1.0  # a wins 2:1:1, y wins 3:1
    assert maj_at_k(answers, correct, 1) == pytest.approx((0.5 + 0.75) / 2)
    assert k_values(8) == [1, 2, 4, 8] and k_values(6) == [1, 2, 4, 6]
    ids = answer_ids(["7", " 7", "8", "9", "1", "1", "1", "2"], 4)
    assert ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 1]]


def test_heldout_metrics_report_pass_and_maj_at_k() -> None:
    results = [
        {
            "accuracy": np.array([1.0]),
            "sample_correct": np.array([[1, 0, 0, 0]], dtype=bool),
            "sample_answers": np.array([[0, 1, 1, 2]]),
        },
        {
            "accuracy": np.array([0.0]),
            "sample_correct": np.array([[0, 0, 0, 0]], dtype=bool),
            "sample_answers": np.array([[0, 0, 0, 0]]),
        },
    ]
    out = heldout_lm_metrics(results)
    assert out["eval/accuracy"] == 0.5
    assert out["eval/pass@1"] == pytest.approx(0.125) and out["eval/pass@4"] == 0.5
    assert out["eval/maj@4"] == 0.0  # the wrong answer 1 wins the first problem's vote


# --------------------------------------------------------------------------- config + learner


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (
            ["grpo.dynamic_sampling=true", "grpo.estimator=reinforce_pp"],
            "grpo.dynamic_sampling",
            "batch baseline",
        ),
        (["grpo.max_resample_rounds=-1"], "grpo.max_resample_rounds", ">= 0"),
        (["grpo.overlong_buffer=-2"], "grpo.overlong_buffer", ">= 0"),
        (["grpo.ratio_level=sentence"], "grpo.ratio_level", "must be one of"),
        (["grpo.loss_agg=seq-sum"], "grpo.loss_agg", "must be one of"),
        (["lm.eval_samples=-1"], "lm.eval_samples", ">= 0"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_config(EXAMPLES / "arithmetic_grpo.yaml", overrides)
    assert info.value.key == key


@pytest.mark.parametrize(
    "example",
    ["arithmetic_dapo", "arithmetic_dr_grpo", "arithmetic_gspo", "arithmetic_reinforce_pp"],
)
def test_examples_load(example: str) -> None:
    cfg = build_config(EXAMPLES / f"{example}.yaml")
    assert cfg.algo == "grpo"


@pytest.mark.parametrize(
    "overrides",
    [
        ["grpo.ratio_level=sequence", "grpo.clip_low=0.0003", "grpo.clip_high=0.0004"],
        [
            "grpo.estimator=reinforce_pp",
            "grpo.kl_in=reward",
            "grpo.kl_estimator=k1",
            "grpo.kl_coef=0.01",
        ],
        ["grpo.estimator=reinforce_pp_baseline", "grpo.kl_coef=0.01"],
        [
            "grpo.std_normalize=false",
            "grpo.loss_agg=seq-mean-token-sum-norm",
            "lm.max_new_tokens=5",
            "grpo.overlong_buffer=3",
            "grpo.clip_high=0.28",
        ],
    ],
    ids=["gspo", "reinforce_pp", "reinforce_pp_baseline", "dr_grpo_overlong"],
)
def test_variant_updates_move_the_policy(model_dir: Path, overrides: list[str]) -> None:
    learner = make_learner("grpo", model_dir, "grpo.micro_batch_size=16", *overrides)
    before = {k: v.clone() for k, v in learner.policy_state().items()}
    metrics = learner.update(make_batch(model_dir), progress=0.0)
    after = learner.policy_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(np.isfinite(v) for v in metrics.values())
    if "grpo.overlong_buffer=3" in overrides:
        assert metrics["reward/overlong_penalty_mean"] < 0  # 5-token completions at the limit


def test_dynamic_sampling_metrics_in_the_update(model_dir: Path) -> None:
    learner = make_learner("grpo", model_dir, "grpo.dynamic_sampling=true")
    batch = make_batch(model_dir)  # its first group is flat
    rewards = batch.rewards.copy()
    out = fill_batch(batch, lambda: make_batch(model_dir, seed=1), max_rounds=0)
    metrics = learner.update(out, progress=0.0)
    assert metrics["rollout/filtered_groups"] == out.filtered_groups >= 1
    assert metrics["reward/mean"] == pytest.approx(float(rewards.mean()))  # all generated
    assert metrics["rollout/flat_group_frac"] == 0.0  # none of them reached the update


def test_probe_checks_cross_section_fields(model_dir: Path) -> None:
    from rlft_ray.learners.grpo import GRPOLearner

    cfg = build_config(
        overrides=[
            "algo=grpo",
            f"lm.model={model_dir}",
            "lm.max_new_tokens=4",
            "grpo.overlong_buffer=8",
        ]
    )
    with pytest.raises(ConfigError) as info:
        GRPOLearner.probe(cfg)
    assert info.value.key == "grpo.overlong_buffer"
    cfg = build_config(
        overrides=[
            "algo=grpo",
            f"lm.model={model_dir}",
            "grpo.ratio_level=sequence",
            "grpo.estimator=reinforce_pp",
        ]
    )
    with pytest.raises(ConfigError) as info:
        GRPOLearner.probe(cfg)
    assert info.value.key == "grpo.ratio_level"


def test_eval_command_prints_pass_and_maj_at_k(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from rlft_ray.cli import main

    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    assert main(["eval", str(model_dir), "--dataset", str(data), "--samples", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = [k for k in result if k.startswith(("pass@", "maj@"))]
    assert keys == ["pass@1", "pass@2", "pass@4", "pass@6", "maj@1", "maj@2", "maj@4", "maj@6"]
    assert result["samples"] == 6 and result["pass@1"] <= result["pass@6"]
    assert result["pass@1"] == pytest.approx(result["maj@1"])  # one voter: its own answer
    assert main(["eval", str(model_dir), "--dataset", str(data), "--samples", "-1"]) == 2


def test_gspo_and_dr_grpo_micro_batches_give_the_whole_batch_gradient(model_dir: Path) -> None:
    from lm_helpers import first_step_grads

    overrides = [
        "grpo.ratio_level=sequence",
        "grpo.std_normalize=false",
        "grpo.loss_agg=seq-mean-token-sum-norm",
    ]
    batch = make_batch(model_dir)
    grads = []
    for size in (64, 3):
        torch.manual_seed(0)
        learner = make_learner("grpo", model_dir, *overrides, f"grpo.micro_batch_size={size}")
        grads.append(first_step_grads(learner, batch))
    whole, micro = grads
    assert any(g.abs().max() > 0 for g in whole.values())
    for key, g in whole.items():
        torch.testing.assert_close(micro[key], g, atol=2e-6, rtol=1e-4, msg=key)


def _counted_update(learner, batch: GenerationBatch) -> tuple[list[int], dict, dict, dict]:
    """``learner.update(batch)``: the rows its policy forwards ran, the gradients its
    optimizer step saw, the parameters after it, and the metrics."""
    seen: list[int] = []
    grads: dict[str, torch.Tensor] = {}
    forward, step = learner.core.forward, learner.optimizer.step
    named = dict(learner.core.policy.named_parameters())

    def counting(module, tensors, idx, entropy=True):
        if module is learner.core.net:
            seen.extend(idx.tolist())
        return forward(module, tensors, idx, entropy)

    def capture(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in named.items() if p.grad is not None})
        return step(*args, **kwargs)

    learner.core.forward, learner.optimizer.step = counting, capture
    metrics = learner.update(batch, progress=0.0)
    return seen, grads, learner.policy_state(), metrics


@pytest.mark.parametrize("all_flat", [False, True])
def test_zero_advantage_rows_are_skipped_with_the_same_update(
    model_dir: Path, all_flat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a KL in the loss, rows of flat groups (advantage exactly 0) never run
    forward or backward, and the step's gradient and parameters are those of the full
    computation (all flat: a step on zero gradients, as the full computation takes)."""
    import rlft_ray.learners.grpo as grpo_module

    batch = make_batch(model_dir)  # its first group is flat
    if all_flat:
        batch.rewards[:] = 1.0
    flat = np.ptp(batch.rewards.reshape(-1, GROUP), axis=-1) == 0
    args = ("grpo.kl_coef=0", "grpo.micro_batch_size=3")
    skipped = _counted_update(make_learner("grpo", model_dir, *args), batch)
    monkeypatch.setattr(grpo_module, "update_rows", lambda *a: None)  # every row runs
    full = _counted_update(make_learner("grpo", model_dir, *args), batch)
    (seen, grads, params, metrics), (seen_all, grads_all, params_all, _) = skipped, full
    assert sorted(seen_all) == list(range(len(batch)))
    assert sorted(seen) == [i for i in range(len(batch)) if not flat[i // GROUP]]
    assert metrics["optim/skipped_rows_frac"] == pytest.approx(flat.mean())
    assert metrics["optim/steps"] == 1.0 and (0 < flat.mean() < 1 or all_flat)
    assert grads.keys() == grads_all.keys() and len(grads) > 5
    for key, g in grads_all.items():
        torch.testing.assert_close(grads[key], g, atol=1e-7, rtol=1e-5, msg=key)
    for key, p in params_all.items():
        torch.testing.assert_close(params[key], p, atol=2e-5, rtol=0, msg=key)  # lr 1e-3 steps


def test_a_tis_weighted_update_is_the_same_with_flat_rows_skipped(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With TIS the learner recomputes log-probs only on the rows the update runs; the
    TIS-weighted gradient and step equal those of recomputing and running every row (a
    sampler 0.3 nats below the learner: every weight exp(0.3))."""
    import rlft_ray.learners.grpo as grpo_module

    batch = make_batch(model_dir)  # its first group is flat
    batch.logprobs = np.where(batch.response_mask, batch.logprobs - 0.3, 0.0).astype(np.float32)
    args = ("grpo.kl_coef=0", "grpo.micro_batch_size=3", "grpo.tis_cap=2.0")
    _, grads, params, metrics = _counted_update(make_learner("grpo", model_dir, *args), batch)
    monkeypatch.setattr(grpo_module, "update_rows", lambda *a: None)  # every row runs
    _, grads_all, params_all, metrics_all = _counted_update(
        make_learner("grpo", model_dir, *args), batch
    )
    assert metrics["optim/skipped_rows_frac"] > 0 and "optim/skipped_rows_frac" not in metrics_all
    for m in (metrics, metrics_all):
        assert m["rollout/tis_mean"] == pytest.approx(float(np.exp(0.3)), abs=1e-3)
    assert grads.keys() == grads_all.keys() and len(grads) > 5
    for key, g in grads_all.items():
        torch.testing.assert_close(grads[key], g, atol=1e-7, rtol=1e-5, msg=key)
    for key, p in params_all.items():
        torch.testing.assert_close(params[key], p, atol=2e-5, rtol=0, msg=key)


def test_every_row_runs_with_the_kl_in_the_loss(model_dir: Path) -> None:
    learner = make_learner("grpo", model_dir, "grpo.kl_coef=0.04", "grpo.kl_in=loss")
    metrics = learner.update(make_batch(model_dir), progress=0.0)
    assert "optim/skipped_rows_frac" not in metrics
