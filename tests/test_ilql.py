"""ILQL: each loss term by hand, the heads' safetensors round trip, value-guided decoding
(beta = 0 is the LM's own greedy decoding; the published heads reach the actor), the
learner without Ray, and one small end-to-end run through Ray (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlft_ray.algorithms import (
    cql_loss,
    expectile_loss,
    ilql_token_losses,
    td_targets,
    value_guided_logits,
)
from rlft_ray.config import LMConfig, build_config
from rlft_ray.learners.base import LearnerContext
from rlft_ray.learners.ilql import ILQLLearner
from rlft_ray.learners.pairwise import LABELLED
from rlft_ray.lm.ilql_heads import HEADS_FILE, ILQLHeads, ilql_generate, load_heads, save_heads
from rlft_ray.lm.labelled import load_labelled
from rlft_ray.lm.loading import load_model_and_tokenizer
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.types import Prompt

from lm_helpers import FrameShard

ROOT = Path(__file__).resolve().parent.parent


def test_expectile_loss_by_hand() -> None:
    diff = torch.tensor([2.0, -2.0, 0.0])
    # tau = 0.7: 0.7 * 4 above, 0.3 * 4 below
    assert expectile_loss(diff, 0.7).tolist() == pytest.approx([2.8, 1.2, 0.0])
    with pytest.raises(ValueError, match="tau"):
        expectile_loss(diff, 1.0)


def test_td_targets_end_each_completion_at_its_last_token() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0], [1.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    y = td_targets(rewards, values, mask, gamma=0.5)
    # row 0: 0 + .5 * .25, 0 + .5 * 9, 1 (terminal); row 1: 0 + .5 * 3, 2 (terminal), pad 0
    assert y.tolist() == [[0.125, 4.5, 1.0], [1.5, 2.0, 0.0]]


def test_td_lambda_mixes_the_return_into_the_target_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0], [1.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # lambda = 1: the discounted return of each completion, gamma = 0.5
    mc = td_targets(rewards, values, mask, gamma=0.5, td_lambda=1.0)
    assert mc.tolist() == [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]]
    # lambda = 0.5, row 0 backwards: G2 = 1; G1 = 0 + .5 (.5 * 9 + .5 * 1) = 2.5;
    # G0 = 0 + .5 (.5 * .25 + .5 * 2.5) = 0.6875. Row 1: G1 = 2; G0 = .5 (.5 * 3 + .5 * 2)
    mixed = td_targets(rewards, values, mask, gamma=0.5, td_lambda=0.5)
    assert mixed.tolist() == [[0.6875, 2.5, 1.0], [1.25, 2.0, 0.0]]
    # lambda = 0 is the one-step target
    assert td_targets(rewards, values, mask, 0.5, 0.0).tolist() == [
        [0.125, 4.5, 1.0],
        [1.5, 2.0, 0.0],
    ]


def test_td_lambda_outside_0_1_fails_naming_the_key() -> None:
    from rlft_ray.config import ConfigError

    for bad in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match=r"ilql.td_lambda.*\[0, 1\]"):
            build_config(overrides=["algo=ilql", f"ilql.td_lambda={bad}"])
    assert build_config(overrides=["algo=ilql", "ilql.td_lambda=1"]).ilql.td_lambda == 1.0


def test_cql_is_the_cross_entropy_of_q_against_the_data_action() -> None:
    q = torch.tensor([[[1.0, 2.0, 0.0]]])
    expected = math.log(math.e + math.e**2 + 1) - 1.0
    assert cql_loss(q, torch.tensor([[0]])).item() == pytest.approx(expected, abs=1e-6)


def test_ilql_token_losses_by_hand() -> None:
    # one completion of 2 tokens over a vocabulary of 2; reward 1 on the last token
    q1 = torch.tensor([[[0.5, 0.0], [0.0, 0.75]]])
    q2 = torch.tensor([[[0.25, 0.0], [0.0, 1.0]]])
    actions = torch.tensor([[0, 1]])
    target_q1, target_q2 = torch.tensor([[0.4, 0.9]]), torch.tensor([[0.6, 0.8]])
    values = torch.tensor([[0.2, 0.5]])
    rewards, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[1, 1]])
    terms = ilql_token_losses(
        q1, q2, target_q1, target_q2, values, rewards, actions, mask, gamma=0.9, tau=0.7
    )
    # y = [0.9 * 0.5, 1.0]; q = (0.5 - .45)^2 + (.25 - .45)^2, (.75 - 1)^2 + (1 - 1)^2
    assert terms["q"].tolist()[0] == pytest.approx([0.0025 + 0.04, 0.0625])
    # v: min target = [0.4, 0.8]; u = [0.2, 0.3] >= 0 -> 0.7 u^2
    assert terms["v"].tolist()[0] == pytest.approx([0.7 * 0.04, 0.7 * 0.09])
    ce = lambda q, a: math.log(sum(math.exp(x) for x in q)) - q[a]  # noqa: E731
    assert terms["cql"].tolist()[0] == pytest.approx(
        [ce([0.5, 0.0], 0) + ce([0.25, 0.0], 0), ce([0.0, 0.75], 1) + ce([0.0, 1.0], 1)]
    )


def test_value_guided_logits_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0]])
    out = value_guided_logits(logits, torch.tensor([[1.0, 3.0]]), torch.tensor([2.0]), beta=0.5)
    assert out.tolist()[0] == pytest.approx([math.log(0.5) - 0.5, math.log(0.5) + 0.5])


def test_heads_round_trip_through_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    heads = ILQLHeads(8, 5)
    path = save_heads(heads, tmp_path)
    assert path.name == HEADS_FILE and path.read_bytes()[:8] != b"\x80\x04"  # not a pickle
    again = load_heads(tmp_path)
    h = torch.randn(3, 8)
    for a, b in zip(heads(h), again(h)):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="lm.decode=ilql"):
        load_heads(tmp_path / "nothing")


def _prompts(tok) -> list[Prompt]:
    return [Prompt(t, tok(t)["input_ids"], {"answer": "3"}) for t in ["1+2=", "12+34=", "5+7="]]


def test_beta_zero_decodes_as_the_lm_and_published_heads_steer_the_actor(model_dir: Path) -> None:
    torch.manual_seed(0)
    lm = LMConfig(model=str(model_dir), max_new_tokens=5)
    plain = GenerationActor(lm)
    guided = GenerationActor(
        LMConfig(model=str(model_dir), max_new_tokens=5, decode="ilql", decode_beta=0.0)
    )
    with pytest.raises(ValueError, match="no ILQL heads"):
        guided.generate(_prompts(guided.tokenizer), greedy=True)
    heads = ILQLHeads(32, plain.model.get_output_embeddings().weight.shape[0])
    weights = {k: v.clone() for k, v in plain.model.state_dict().items()}
    weights.update({f"ilql_heads.{k}": v for k, v in heads.state_dict().items()})
    guided.set_weights(weights, version=1)  # heads split off, LM weights loaded as usual
    prompts = _prompts(plain.tokenizer)
    a, b = plain.generate(prompts, greedy=True), guided.generate(prompts, greedy=True)
    assert a.completions == b.completions
    # a huge beta with a Q that prefers one token: every step picks it
    with torch.no_grad():
        last = heads.target_q1[2]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[7] = 1.0
        heads.target_q2.load_state_dict(heads.target_q1.state_dict())
    tokens, logps = ilql_generate(
        plain.model,
        heads,
        torch.tensor([prompts[0].ids]),
        torch.ones(1, len(prompts[0].ids)),
        4,
        [],
        0,
        beta=1e3,
    )
    assert tokens.tolist() == [[7, 7, 7, 7]] and logps.shape == (1, 4)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = []
    for a, b in [(1, 2), (12, 30), (5, 37), (40, 40), (9, 9), (3, 30), (22, 7), (14, 14)] * 4:
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b), "reward": 1.0})
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b + 10), "reward": 0.0})
    path = tmp_path_factory.mktemp("r") / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ilql_learner_fits_q_to_the_rewards_and_saves_the_heads(
    model_dir: Path, reward_file: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    cfg = build_config(
        overrides=[
            "algo=ilql",
            f"lm.model={model_dir}",
            f"ilql.data={reward_file}",
            "lm.decode=ilql",
            "lm.max_prompt_tokens=16",
            "lm.max_completion_tokens=8",
            "ilql.batch_size=16",
            "ilql.micro_batch_size=8",
            "ilql.optim.lr=3e-3",
            "ilql.polyak=0.5",
        ]
    )
    table, _ = load_labelled(
        reward_file, load_model_and_tokenizer(model_dir)[1], cfg.lm, "ilql.data", "reward"
    )
    learner = ILQLLearner(cfg, None, LearnerContext(0, 1, datasets={LABELLED: FrameShard(table)}))
    target_before = learner.heads.target_q1[0].weight.clone()
    first = learner.update(learner.next_batch(0), progress=0.0)
    for step in range(1, 25):
        last = learner.update(learner.next_batch(step), progress=0.5)
    assert first["optim/grad_accum_steps"] == 2 and np.isfinite(last["loss/q"])
    assert last["loss/q"] < first["loss/q"] and last["loss/bc"] < first["loss/bc"]
    assert not torch.equal(learner.heads.target_q1[0].weight, target_before)  # Polyak moved it
    state = learner.policy_state()
    assert any(k.startswith("ilql_heads.q1.") for k in state)
    assert "ilql_heads" in learner.modules()
    (tmp_path / "policy").mkdir()
    learner.save_extras(tmp_path)
    again = load_heads(tmp_path / "policy")
    h = torch.randn(2, 32)
    torch.testing.assert_close(again.target_q(h), learner.heads.target_q(h))


def test_awac_weights_by_hand() -> None:
    from rlft_ray.algorithms import awac_weights

    adv = torch.tensor([[0.0, 0.5, -1.0, 10.0]])
    w = awac_weights(adv, temperature=0.5)
    assert w.tolist()[0] == pytest.approx([1.0, math.e, math.exp(-2.0), 20.0])  # clipped at 20
