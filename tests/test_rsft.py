"""RSFT without Ray: selection on the generation actor, the learner on accepted samples
(empty rounds, reward weights, reset to the base, DDP with unequal shares), and the
checks that run before Ray."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlft_ray.config import ConfigError, LMConfig, RSFTConfig, build_config
from rlft_ray.learners.base import LearnerContext
from rlft_ray.learners.rsft import EmptyRoundsError, RSFTLearner
from rlft_ray.lm.tiny import make_tiny_model
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.rollout.selection import Selector
from rlft_ray.types import GenerationBatch, Prompt, SelectionStats

from lm_helpers import (
    GROUP,
    first_step_grads,
    free_port,
    generate_with_drawing_recorder,
    make_batch,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DATA = Path(__file__).resolve().parent.parent / "data"


def _prompts(actor: GenerationActor, texts: list[str]) -> list[Prompt]:
    return [Prompt(t, actor.tokenizer(t)["input_ids"], {"answer": "42"}) for t in texts]


def _learner(model_dir: Path, *overrides: str, rank: int = 0, world: int = 1) -> RSFTLearner:
    cfg = build_config(overrides=["algo=rsft", f"lm.model={model_dir}", *overrides])
    return RSFTLearner(cfg, None, LearnerContext(rank, world))


def selected(batch: GenerationBatch, keep: np.ndarray) -> GenerationBatch:
    """``batch``'s rows ``keep`` with the selection stats an actor would attach."""
    out = batch.take(keep)
    out.selection = SelectionStats(
        rewards=batch.rewards.copy(),
        lengths=batch.response_mask.sum(1).astype(np.int64),
        accepted=keep,
    )
    return out


def test_actor_sends_only_accepted_samples_with_stats_of_all(model_dir: Path) -> None:
    lm = LMConfig(
        model=str(model_dir),
        num_samples=GROUP,
        max_new_tokens=5,
        reward_fn="envs.arithmetic:digit_fraction",  # graded: completions of a group differ
    )
    actor = GenerationActor(lm, seed=3, selection=RSFTConfig(select="best_of_n", top_k=1))
    batch = actor.sample(_prompts(actor, ["1+2=", "12+30=", "5+37="]))
    sel = batch.selection
    assert len(batch) == 3 and sel.num_generated == 12 and sel.num_accepted == 3
    assert batch.num_steps == 12 and batch.counts()["accepted"] == 3
    assert len(batch.episodes.returns) == 12  # episode stats cover every generated sample
    # each kept completion has its group's highest reward
    best = sel.rewards.reshape(3, GROUP).max(axis=1)
    assert np.allclose(batch.rewards, best)
    assert sorted(batch.group_ids.tolist()) == [0, 1, 2]
    # the kept rows are the generated rows: same tokens, log-probs and completion text
    rows = np.flatnonzero(sel.accepted)
    full = GenerationActor(lm, seed=3).generate(_prompts(actor, ["1+2=", "12+30=", "5+37="]))
    assert [full.completions[i] for i in rows] == batch.completions
    assert np.allclose(full.logprobs[rows], batch.logprobs)


def test_min_reward_and_threshold_drop_everything_below_the_bar(model_dir: Path) -> None:
    rewards = np.array([0.2, 0.5, 0.9, 0.4, 1.0, 0.0])
    below = [False, True, True, False, True, False]  # r >= 0.5
    assert (
        Selector(RSFTConfig(select="threshold", threshold=0.5), 0)(rewards, 3).keep.tolist()
        == below
    )
    assert Selector(RSFTConfig(select="all", min_reward=0.5), 0)(rewards, 3).keep.tolist() == below
    # min_reward applies after the rule: the best of each group of 3, if it reaches 0.95
    best_floor = RSFTConfig(select="best_of_n", top_k=1, min_reward=0.95)
    assert Selector(best_floor, 0)(rewards, 3).keep.tolist() == [False] * 4 + [True, False]
    # on the actor: a reward with a spread, a threshold between its values
    lm = LMConfig(
        model=str(model_dir),
        num_samples=GROUP,
        max_new_tokens=3,
        reward_fn="lm_helpers:spread_reward",
    )
    every = GenerationActor(lm, seed=0, selection=RSFTConfig(select="all"))
    texts = ["1+2=", "12+30=", "5+37=", "40+40="]
    r = every.sample(_prompts(every, texts)).selection.rewards
    tau = float(np.sort(np.unique(r))[len(np.unique(r)) // 2])
    assert r.min() < tau <= r.max()  # some samples below the bar, some at or above it
    actor = GenerationActor(lm, seed=0, selection=RSFTConfig(select="threshold", threshold=tau))
    batch = actor.sample(_prompts(actor, texts))
    assert np.array_equal(batch.selection.rewards, r)  # the same seeded samples
    assert batch.selection.accepted.tolist() == (r >= tau).tolist()
    assert np.array_equal(batch.rewards, r[r >= tau]) and len(batch) == int((r >= tau).sum())
    # nothing reaches the bar: an empty batch that still counts every generated sample
    none = GenerationActor(lm, seed=0, selection=RSFTConfig(select="all", min_reward=5.0))
    empty = none.sample(_prompts(none, ["1+2="]))
    assert len(empty) == 0 and empty.selection.num_generated == GROUP
    assert empty.prompt_ids.shape[0] == 0 and empty.completions == []


def test_tilted_acceptance_bound_is_the_known_max_or_the_running_max() -> None:
    exact = Selector(RSFTConfig(select="acceptance", beta=0.5, reward_max=1.0), seed=0)
    out = exact(np.array([1.0, 0.0, 2.0]), group_size=3)
    assert out.bound == 1.0 and out.clipped == 1  # the 2.0 above the known bound is clipped
    running = Selector(RSFTConfig(select="acceptance", beta=0.5), seed=0)
    assert running(np.array([0.2, 0.4]), 2).bound == 0.4
    assert running(np.array([0.1, 0.3]), 2).bound == 0.4  # the maximum of all rewards seen
    assert running(np.array([0.9, 0.0]), 2).bound == 0.9
    # r = r_max is always kept; r_max - 10 beta never in practice (exp(-10))
    keeps = [running(np.array([0.9, 0.9 - 5.0]), 2).keep for _ in range(200)]
    assert all(k[0] for k in keeps) and sum(k[1] for k in keeps) < 5


def test_target_acceptance_estimates_log_m_on_warm_up_and_counts_clipping() -> None:
    sel = Selector(RSFTConfig(select="acceptance", target_model="t"), seed=0)
    rewards = np.zeros(3)
    first = sel(
        rewards,
        3,
        proposal_logp=np.array([-2.0, -2.0, -3.0]),
        target_logp=np.array([-1.0, -3.0, -3.0]),
    )
    assert first.bound == pytest.approx(1.0) and first.clipped == 0  # max log p - log q
    second = sel(
        rewards,
        3,
        proposal_logp=np.array([-4.0, -1.0, -1.0]),
        target_logp=np.array([-1.0, -1.0, -1.0]),
    )
    assert second.bound == pytest.approx(1.0) and second.clipped == 1  # 3.0 > log M


def test_update_fits_accepted_completions_and_skips_empty_rounds(model_dir: Path) -> None:
    batch = make_batch(model_dir, n_prompts=4)
    keep = batch.rewards > 0
    learner = _learner(
        model_dir, "rsft.optim.lr=3e-3", "rsft.num_epochs=2", "rsft.max_empty_rounds=2"
    )
    sub = selected(batch, keep)
    core = learner.core

    def nll() -> float:
        t = core.tensors(sub)
        out = core.forward(core.policy, t, torch.arange(len(sub)))
        return float(-(out.logprobs.detach() * t["mask"][:, : out.logprobs.shape[1]]).sum())

    before = nll()
    metrics = learner.update(sub, progress=0.0)
    for _ in range(3):
        learner.update(sub, progress=0.0)
    assert nll() < 0.7 * before
    assert metrics["rollout/accept_rate"] == pytest.approx(keep.mean())
    assert metrics["rollout/accepted"] == keep.sum() and metrics["optim/steps"] == 2 * 4
    assert metrics["rollout/reward_mean_accepted"] == 1.0
    assert metrics["reward/mean"] == pytest.approx(batch.rewards.mean())
    # a round that accepts nothing: reported, no step, the weights stay; then a clear stop
    empty = selected(batch, np.zeros(len(batch), dtype=bool))
    weights = {k: v.clone() for k, v in learner.policy_state().items()}
    out = learner.update(empty, progress=0.5)
    assert out["rollout/accept_rate"] == 0.0 and out["rollout/empty_rounds"] == 1.0
    assert "loss/nll" not in out and "rollout/reward_mean_accepted" not in out
    assert all(torch.equal(weights[k], v) for k, v in learner.policy_state().items())
    with pytest.raises(EmptyRoundsError, match="2 rounds in a row accepted no sample"):
        learner.update(empty, progress=0.5)


def test_reward_weights_are_clamped_rewards_over_their_mean(model_dir: Path) -> None:
    learner = _learner(model_dir, "rsft.weighting=reward")
    w = learner.sample_weights(torch.tensor([0.0, 1.0, 2.0, -1.0]))
    assert w.tolist() == pytest.approx([0.0, 4 / 3, 8 / 3, 0.0])
    assert learner.sample_weights(torch.tensor([0.0, -1.0])).tolist() == [1.0, 1.0]


def test_reset_to_base_trains_each_round_from_the_start(model_dir: Path) -> None:
    b1 = make_batch(model_dir, n_prompts=3, seed=1)
    b2 = make_batch(model_dir, n_prompts=3, seed=2)
    keep1, keep2 = np.ones(len(b1), dtype=bool), b2.rewards > 0
    torch.manual_seed(0)
    resetting = _learner(model_dir, "rsft.reset_to_base=true", "rsft.optim.lr=3e-3")
    resetting.update(selected(b1, keep1), 0.0)
    after_first = {k: v.clone() for k, v in resetting.policy_state().items()}
    shuffles = resetting.core.torch_rng.get_state()
    resetting.update(selected(b2, keep2), 0.0)
    resetting_state = resetting.policy_state()
    fresh = _learner(model_dir, "rsft.optim.lr=3e-3")
    fresh.core.torch_rng.set_state(shuffles)  # the same minibatch order as the second round
    fresh.update(selected(b2, keep2), 0.0)
    assert any(not torch.equal(after_first[k], resetting_state[k]) for k in after_first)
    for k, v in fresh.policy_state().items():
        torch.testing.assert_close(resetting_state[k], v, msg=k)


def _ddp_worker(rank: int, port: int, model_dir: str, batch: GenerationBatch, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # rank 0 holds 5 accepted rows, rank 1 none: rank 1 must still meet every all-reduce
        keep = np.zeros(len(batch), dtype=bool)
        if rank == 0:
            keep[:5] = True
        for name, overrides in DDP_CASES.items():
            torch.manual_seed(0)
            learner = _learner(Path(model_dir), *overrides, rank=rank, world=2)
            grads = first_step_grads(learner, selected(batch, keep))
            torch.save(grads, Path(out) / f"{name}-rank{rank}.pt")
            del learner
            gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


DDP_CASES = {
    "one-step": ["rsft.num_minibatches=1", "rsft.micro_batch_size=2"],
    "weighted-seq-mean": [
        "rsft.num_minibatches=1",
        "rsft.weighting=reward",
        "rsft.loss_agg=seq-mean-token-mean",
    ],
}


def test_ddp_with_unequal_accepted_shares_matches_one_worker(
    model_dir: Path, tmp_path: Path
) -> None:
    batch = make_batch(model_dir, n_prompts=2)
    batch.rewards = np.linspace(0.2, 1.0, len(batch)).astype(np.float32)
    mp.spawn(_ddp_worker, args=(free_port(), str(model_dir), batch, str(tmp_path)), nprocs=2)
    keep = np.zeros(len(batch), dtype=bool)
    keep[:5] = True
    for name, overrides in DDP_CASES.items():
        torch.manual_seed(0)
        alone = first_step_grads(_learner(model_dir, *overrides), selected(batch, keep))
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(2)]
        assert set(alone) == set(ranks[0]) == set(ranks[1]) and len(alone) > 5
        for key, g in alone.items():
            for r in range(2):
                torch.testing.assert_close(
                    ranks[r][key], g, atol=2e-6, rtol=1e-4, msg=f"{name}: rank {r} grad of {key}"
                )


@pytest.mark.parametrize(
    ("override", "key", "text"),
    [
        ("rsft.select=best", "rsft.select", "did you mean 'best_of_n'"),
        ("rsft.quantile=1.5", "rsft.quantile", "(0, 1]"),
        ("rsft.beta=0", "rsft.beta", "must be > 0"),
        ("rsft.top_k=0", "rsft.top_k", ">= 1"),
        ("rsft.target_model=m", "rsft.target_model", "only used by rsft.select=acceptance"),
        ("rsft.log_m=2.0", "rsft.log_m", "set rsft.target_model too"),
        ("rsft.max_empty_rounds=-1", "rsft.max_empty_rounds", ">= 0"),
        ("rsft.min_reward=2.0", "rsft.min_reward", "above rsft.reward_max=1.0"),
        ("rsft.select=threshold rsft.threshold=1.5", "rsft.threshold", "no sample could be"),
    ],
)
def test_bad_selection_settings_name_the_key(override: str, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(EXAMPLES / "arithmetic_rsft.yaml", override.split())
    assert info.value.key == key and text in str(info.value)


def test_target_model_checks_run_before_ray(model_dir: Path, tmp_path: Path) -> None:
    base = [f"lm.model={model_dir}", f"lm.prompts={DATA / 'arith_train.jsonl'}"]
    acceptance = ["rsft.select=acceptance", f"rsft.target_model={model_dir}"]
    cfg = build_config(EXAMPLES / "arithmetic_rsft.yaml", [*base, *acceptance, "lm.top_p=0.9"])
    with pytest.raises(ConfigError, match=r"lm.top_p: .*set lm.top_p=1.0"):
        RSFTLearner.probe(cfg)
    # a target whose tokenizer has another vocabulary
    other = make_tiny_model(tmp_path / "other", n_layer=1, hidden=32, n_head=2, max_positions=64)
    vocab_file = other / "tokenizer.json"
    vocab_file.write_text(vocab_file.read_text().replace('"z": ', '"Z2": ', 1))
    cfg = build_config(
        EXAMPLES / "arithmetic_rsft.yaml",
        [*base, "rsft.select=acceptance", f"rsft.target_model={other}"],
    )
    with pytest.raises(ConfigError, match=r"rsft.target_model: its tokenizer differs"):
        RSFTLearner.probe(cfg)
    ok = RSFTLearner.probe(
        build_config(EXAMPLES / "arithmetic_rsft.yaml", [*base, *acceptance, "rsft.rounds=7"])
    )
    assert ok.cfg.total_iterations == 7 and Path(ok.cfg.rsft.target_model).is_absolute()
    assert math.isfinite(ok.info["data/kept"])


def test_quickstart_runs_rsft_from_its_example(tmp_path: Path) -> None:
    from rlft_ray.apps.quickstart import QuickstartSettings, _rl_config

    cfg = _rl_config(
        tmp_path,
        tmp_path / "train.jsonl",
        tmp_path / "test.jsonl",
        QuickstartSettings(algo="rsft"),
        [],
    )
    assert cfg.algo == "rsft" and cfg.eval_every == 1 and cfg.lm.model == str(tmp_path / "sft_base")
    with pytest.raises(ConfigError, match="--algo: the LM quickstart runs grpo or rsft"):
        _rl_config(tmp_path, tmp_path, tmp_path, QuickstartSettings(algo="dpo"), [])


def test_sampling_ignores_processors_a_checkpoint_ships(tmp_path: Path) -> None:
    """A model whose generation_config.json asks for repetition_penalty / min_p / n-gram
    blocking is sampled from exactly the temperature-scaled distribution that is recorded:
    the recorder, which draws the tokens, sees the raw logits."""
    import json

    model = make_tiny_model(tmp_path / "m", n_layer=1, hidden=32, n_head=2, max_positions=64)
    gen = json.loads((model / "generation_config.json").read_text())
    gen.update(repetition_penalty=1.5, min_p=0.05, no_repeat_ngram_size=1, top_k=5)
    (model / "generation_config.json").write_text(json.dumps(gen))
    actor = GenerationActor(LMConfig(model=str(model), temperature=0.7, max_new_tokens=6), seed=0)
    prompts = _prompts(actor, ["1+2=", "30+4="])
    tokens, real, taken = generate_with_drawing_recorder(actor, prompts, 4, 0.7)
    # taken: -inf but at the recorder's draw: nothing after it
    assert (taken.isfinite().sum(-1) == 1).all()
    assert torch.equal(taken.argmax(-1)[real], tokens[real])
