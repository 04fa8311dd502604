"""Multi-turn rollouts without Ray (scripted and real models), the learners on episode
batches (loss mask over the model's tokens only, gapped GAE), and the agent config checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.tool_arithmetic import ToolArithmeticEnv
from rlft_ray.algorithms import gapped_gae
from rlft_ray.config import ConfigError, EnvConfig, LMConfig, build_config
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.lm.policy import PolicyWithValueHead, response_forward
from rlft_ray.lm.tiny import build_tokenizer
from rlft_ray.rollout.evaluate import seed_prompts
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.rollout.multiturn import TurnLimits, run_episodes
from rlft_ray.types import GenerationBatch, Prompt, pad_sequences

from lm_helpers import first_step_grads, make_learner

TOK = build_tokenizer()
EOS = TOK.eos_token_id
LOGP = -0.5


def scripted(reply_for, obey_caps: bool = True):
    """A ``generate`` that answers each context with ``reply_for(context text)`` + EOS,
    every token at log-prob -0.5 (cut to each context's cap unless ``obey_caps`` is
    False, as the vLLM engine's one cap per call does); counts its calls (one per turn)."""
    calls = []

    def generate(prompts: list[Prompt], max_new: list[int]) -> GenerationBatch:
        calls.append(len(prompts))
        rows = []
        for p, cap in zip(prompts, max_new, strict=True):
            ids = TOK(reply_for(TOK.decode(p.ids)), add_special_tokens=False)["input_ids"]
            rows.append([*ids, EOS][: cap if obey_caps else None])
        ids, mask = pad_sequences(rows, TOK.pad_token_id, "right")
        n = len(prompts)
        return GenerationBatch(
            prompt_ids=np.zeros((n, 1), np.int64),
            prompt_mask=np.ones((n, 1), bool),
            response_ids=ids,
            response_mask=mask,
            logprobs=np.where(mask, LOGP, 0.0).astype(np.float32),
            rewards=np.zeros(n, np.float32),
            group_ids=np.arange(n),
            prompts=[""] * n,
            completions=TOK.batch_decode(
                [r[m].tolist() for r, m in zip(ids, mask)], skip_special_tokens=True
            ),
            metadata=[{}] * n,
            policy_version=0,
            group_size=1,
            pad_token_id=TOK.pad_token_id,
        )

    generate.calls = calls
    return generate


def calculator_user(context: str) -> str:
    """Call the calculator, then copy its result."""
    if "<result>" in context:
        return context.split("<result>")[1].split("</result>")[0]
    question = context.rstrip("=")
    return f"<calc>{question}</calc>"


LIMITS = TurnLimits(max_turns=3, max_new_tokens=30, max_tokens=120, step_timeout_s=5.0)


def test_episodes_alternate_model_and_env_tokens_token_in_token_out() -> None:
    gen = scripted(calculator_user)
    batch = run_episodes(
        gen, TOK, ToolArithmeticEnv, seeds=[0, 1], samples_per_seed=2, limits=LIMITS
    )
    assert gen.calls == [4, 4]  # every active episode in one call per turn
    env = ToolArithmeticEnv()
    env.reset(seed=0)
    a, b, product = env.a, env.b, env.a * env.b
    call, reply = f"<calc>{a}*{b}</calc>", f"\n<result>{product}</result>\n"
    row = batch.response_ids[0][batch.response_mask[0]].tolist()
    # model turn (its sampled ids, EOS kept) | env reply (tokenised once) | model turn
    assert TOK.decode(row) == f"{call}<eos>{reply}{product}<eos>"
    assert TOK.decode(batch.prompt_ids[0][batch.prompt_mask[0]].tolist()) == f"{a}*{b}="
    n_call, n_reply, n_answer = len(call) + 1, len(reply), len(str(product)) + 1
    expected_mask = [True] * n_call + [False] * n_reply + [True] * n_answer
    assert batch.loss_mask[0][: len(row)].tolist() == expected_mask
    assert np.allclose(batch.logprobs[0][: len(row)], np.where(expected_mask, LOGP, 0.0))
    # the turn rewards sit on each turn's last token: 0 after the call, 1 after the answer
    assert batch.step_rewards[0].sum() == 1.0 and batch.step_rewards[0][len(row) - 1] == 1.0
    assert batch.rewards.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert batch.group_ids.tolist() == [0, 0, 1, 1] and batch.group_size == 2
    stats = batch.agent.metrics()
    assert stats["rollout/turns_mean"] == 2.0 and stats["rollout/tool_calls_mean"] == 1.0
    assert stats["rollout/truncated_frac"] == 0.0 and stats["rollout/agent_success_rate"] == 1.0
    assert batch.num_tokens == 4 * (n_call + n_answer)  # the model's tokens only
    assert batch.episodes.returns == [1.0] * 4 and batch.episodes.lengths == [2] * 4


def test_max_turns_and_the_token_budget_truncate() -> None:
    always_call = scripted(lambda ctx: "<calc>1+1</calc>")
    capped = dataclasses.replace(LIMITS, max_turns=2)
    batch = run_episodes(always_call, TOK, lambda: ToolArithmeticEnv(max_turns=9), [0], 1, capped)
    assert batch.agent.turns.tolist() == [2] and batch.agent.truncated.tolist() == [True]
    assert batch.rewards.tolist() == [0.0]
    tight = dataclasses.replace(LIMITS, max_tokens=40)  # prompt 8 + call 18 + reply 15 > 40
    batch = run_episodes(always_call, TOK, lambda: ToolArithmeticEnv(max_turns=9), [0], 1, tight)
    assert batch.agent.turns.tolist() == [1] and batch.agent.truncated.tolist() == [True]
    assert len(batch.prompt_ids[0]) + batch.response_mask[0].sum() <= 40
    # A generate that samples past a row's cap is cut to it here, its text decoded anew.
    careless = scripted(lambda ctx: "<calc>1+1</calc>", obey_caps=False)
    short = dataclasses.replace(LIMITS, max_new_tokens=7, max_turns=1)
    batch = run_episodes(careless, TOK, ToolArithmeticEnv, [0], 1, short)
    assert TOK.decode(batch.response_ids[0][batch.response_mask[0]]) == "<calc>1"
    assert batch.completions == ["<calc>1"] and batch.logprobs.shape[1] == 7


def test_a_hung_env_step_fails_its_episode_with_the_reason_not_the_batch() -> None:
    class HangsOnSeed1(ToolArithmeticEnv):
        def step(self, action: str):
            if self.np_random_seed == 1:
                import time

                time.sleep(3)
            return super().step(action)

    limits = dataclasses.replace(LIMITS, step_timeout_s=0.2)
    batch = run_episodes(scripted(calculator_user), TOK, HangsOnSeed1, [0, 1], 1, limits)
    assert batch.agent.failed.tolist() == [False, True]
    assert batch.rewards.tolist() == [1.0, 0.0]
    assert "timed out after 0.2 s" in batch.agent.reasons[0]
    assert batch.agent.metrics()["rollout/failed_episodes"] == 1.0
    # With release_env the finished episode's env is handed back for the next batch
    # (reset starts its next episode); the timed-out one, whose step may still run, is not.
    made, idle = [], []

    def make() -> HangsOnSeed1:
        made.append(HangsOnSeed1())
        return made[-1]

    run_episodes(scripted(calculator_user), TOK, make, [0, 1], 1, limits, release_env=idle.append)
    assert idle == [made[0]]
    reused = run_episodes(
        scripted(calculator_user),
        TOK,
        lambda: idle.pop() if idle else make(),
        [2, 3],
        1,
        LIMITS,
        release_env=idle.append,
    )
    assert len(made) == 3 and reused.rewards.tolist() == [1.0, 1.0]  # one env made anew


def test_actor_samples_episodes_whose_logprobs_the_learner_reproduces(model_dir: Path) -> None:
    """Token-in / token-out: the learner's forward over prompt + all turns (env tokens
    attended) gives the sampler's log-probs on the model's tokens."""
    lm = LMConfig(model=str(model_dir), num_samples=3, max_new_tokens=6, max_turns=3)
    actor = GenerationActor(lm, seed=0, env=EnvConfig(id="rlft/GuessNumber-v0"))
    batch = actor.sample(seed_prompts([4, 5]))
    assert len(batch) == 6 and batch.agent is not None and (batch.agent.turns >= 1).all()
    assert (batch.loss_mask <= batch.response_mask).all()
    assert (~batch.loss_mask & batch.response_mask).any()  # env replies in the middle
    policy = PolicyWithValueHead(actor.model)
    t = lambda x: torch.as_tensor(x)  # noqa: E731
    out = response_forward(
        policy,
        t(batch.prompt_ids),
        t(batch.prompt_mask),
        t(batch.response_ids),
        t(batch.response_mask),
        lm.temperature,
    )
    mask = batch.loss_mask
    assert np.allclose(out.logprobs.detach().numpy()[mask], batch.logprobs[mask], atol=1e-4)


@pytest.fixture(scope="module")
def agent_batch(model_dir: Path) -> GenerationBatch:
    lm = LMConfig(model=str(model_dir), num_samples=4, max_new_tokens=6, max_turns=3)
    actor = GenerationActor(lm, seed=1, env=EnvConfig(id="rlft/GuessNumber-v0"))
    batch = actor.sample(seed_prompts([0, 1]))
    batch.rewards = np.array([1, 0, 0, 1, 0, 1, 1, 0], np.float32)  # a signal in each group
    batch.step_rewards = np.zeros_like(batch.logprobs)  # ... on each episode's last token
    last = batch.loss_mask.shape[1] - 1 - np.argmax(batch.loss_mask[:, ::-1], axis=1)
    batch.step_rewards[np.arange(len(batch)), last] = batch.rewards
    return batch


@pytest.mark.parametrize("algo", ["grpo", "lm_ppo"])
def test_env_tokens_carry_no_loss(model_dir: Path, agent_batch: GenerationBatch, algo: str) -> None:
    """The environment's tokens are attended but not trained: garbage old log-probs on them
    leave the gradient unchanged; training on every token changes it."""
    kw = ["grpo.kl_coef=0", "lm.track_kl=false"] if algo == "grpo" else ["lm_ppo.kl_coef=0"]
    base = first_step_grads(make_learner(algo, model_dir, *kw), agent_batch)
    env_tokens = agent_batch.response_mask & ~agent_batch.loss_mask
    junk = dataclasses.replace(
        agent_batch, logprobs=np.where(env_tokens, -9.0, agent_batch.logprobs)
    )
    same = first_step_grads(make_learner(algo, model_dir, *kw), junk)
    every = dataclasses.replace(junk, loss_mask=agent_batch.response_mask.copy())
    other = first_step_grads(make_learner(algo, model_dir, *kw), every)
    assert all(torch.allclose(base[k], same[k], atol=1e-7) for k in base)
    assert any(not torch.allclose(base[k], other[k]) for k in base)


def test_grpo_update_reports_agent_metrics(model_dir: Path, agent_batch: GenerationBatch) -> None:
    learner = make_learner("grpo", model_dir, "grpo.kl_coef=0")
    metrics = learner.update(agent_batch, progress=0.0)
    expected = agent_batch.agent.metrics()
    for key in ("rollout/turns_mean", "rollout/tool_calls_mean", "rollout/truncated_frac"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["rollout/env_s"] >= 0 and np.isfinite(metrics["loss/policy"])


def test_gapped_gae_by_hand() -> None:
    """Tokens m . m (the middle one the env's): the bootstrap skips it.
    delta_2 = 1 - 0.2 = 0.8 = A_2; delta_0 = 0 + 0.2 - 0.5 = -0.3, A_0 = -0.3 + 0.8 = 0.5."""
    adv, ret = gapped_gae(
        torch.tensor([[0.0, 5.0, 1.0]]),
        torch.tensor([[0.5, 9.0, 0.2]]),
        torch.tensor([[1, 0, 1]]),
        1.0,
        1.0,
    )
    assert torch.allclose(adv, torch.tensor([[0.5, 0.0, 0.8]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 0.0, 1.0]]))


# ------------------------------------------------------------------------------- config


def _agent_cfg(model_dir: Path, *overrides: str):
    return build_config(
        overrides=[
            "algo=grpo",
            f"lm.model={model_dir}",
            "env.id=rlft/ToolArithmetic-v0",
            "lm.max_prompt_tokens=16",
            "lm.max_new_tokens=16",
            "lm.prompts_per_iteration=4",
            "env.train_seeds=50",
            *overrides,
        ]
    )


def test_probe_of_an_agent_run_gives_seed_tables(model_dir: Path) -> None:
    from rlft_ray.lm.prompts import prompts_from_batch

    cfg = _agent_cfg(model_dir, "seed=3", "eval_every=5", "eval_episodes=7")
    probe = get_learner_cls("grpo").probe(cfg)
    seeds = [p.metadata["seed"] for p in prompts_from_batch(probe.datasets["prompts"])]
    assert seeds == list(range(3, 53))
    heldout = prompts_from_batch(probe.tables["heldout_prompts"])
    assert [p.metadata["seed"] for p in heldout] == list(range(1_000_003, 1_000_010))
    assert probe.info["env"] == "rlft/ToolArithmetic-v0"


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["env.id=CartPole-v1"], "lm.prompts", "needs a prompt file.*or env.id naming a text"),
        (["env.id=rlft/ToolArithmetc-v0"], "env.id", "not a registered"),
        (["env.kwargs.digits=0"], "env.id", "cannot be made"),
        (["lm.max_prompt_tokens=4"], "lm.max_prompt_tokens", "first observation has 8 tokens"),
        (["lm.prompts_per_iteration=3"], "lm.prompts_per_iteration", "cannot be split"),
        (["lm.chat_template=true"], "lm.chat_template", "not supported"),
        (["lm.reward_model=rm"], "lm.reward_model", "rewarded by its environment"),
    ],
)
def test_agent_probe_errors_name_the_key(
    model_dir: Path, overrides: list[str], key: str, message: str
) -> None:
    cfg = _agent_cfg(model_dir, *overrides)
    with pytest.raises(ConfigError, match=message) as info:
        get_learner_cls("grpo").probe(cfg)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lm.max_turns=0", "lm.max_turns: must be >= 1"),
        ("env.step_timeout_s=0", "env.step_timeout_s: must be > 0"),
        ("lm.reward_timeout_s=-1", "lm.reward_timeout_s: must be > 0"),
    ],
)
def test_agent_config_ranges(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[override])


def test_a_hung_reward_function_scores_zero_and_is_counted(model_dir: Path) -> None:
    lm = LMConfig(
        model=str(model_dir),
        num_samples=2,
        max_new_tokens=3,
        reward_fn="tests.test_agent_rollout:hanging_reward",
        reward_timeout_s=0.3,
    )
    actor = GenerationActor(lm, seed=0)
    batch = actor.sample([Prompt("1+1=", TOK("1+1=")["input_ids"], {"answer": "2"})])
    assert batch.rewards.tolist() == [0.0, 0.0] and batch.reward_timeouts == 1


def hanging_reward(prompts, completions, metadata):
    import time

    time.sleep(5)
    return [1.0] * len(completions)


def test_eval_command_plays_held_out_episodes(model_dir: Path, capsys) -> None:
    from rlft_ray.cli import main

    overrides = ["env.id=rlft/GuessNumber-v0", "lm.max_new_tokens=3", "lm.max_turns=2"]
    assert main(["eval", str(model_dir), *overrides, "--episodes", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["env"] == "rlft/GuessNumber-v0" and result["episodes"] == 3
    assert 1.0 <= result["turns_mean"] <= 2.0 and 0.0 <= result["accuracy"] <= 1.0


def test_sample_job_refuses_an_agent_config(model_dir: Path, tmp_path: Path) -> None:
    from rlft_ray.apps.sample import run_sampling

    cfg = _agent_cfg(model_dir, "algo=rsft")
    with pytest.raises(ConfigError, match="needs a prompt file") as info:
        run_sampling(cfg, tmp_path / "s")
    assert info.value.key == "lm.prompts" and not (tmp_path / "s").exists()
