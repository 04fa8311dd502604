"""ILQL: offline token-level Q-learning on an LM from a reward-labelled set (``algo: ilql``).

Each iteration is one optimizer step on ``ilql.batch_size`` completions of ``ilql.data``
(each rank reads its share from its Ray Data shard), micro-batched, DDP across ranks.
One forward gives the LM's last hidden states predicting each completion token; the LM
head's log-probs (the behaviour-cloning NLL), the twin Q heads, V and, without gradient,
the target Q heads read them (:class:`ILQLNet`). The per-token loss is
:func:`~rlft_ray.algorithms.ilql.ilql_token_losses` weighted by the ``ilql`` section,
averaged over the minibatch's tokens; after each step the target heads move towards the
Q heads (Polyak). Held-out evaluation decodes on the generation actors, value-guided
with ``lm.decode: ilql`` (the learner publishes the heads with the LM's weights).
Metrics: ``loss/q``, ``loss/v``, ``loss/cql``, ``loss/bc``, ``values/q_mean``,
``values/v_mean``, ``values/advantage_mean`` (token means).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from rlft_ray.algorithms import awac_weights, ilql_token_losses, token_rewards
from rlft_ray.algorithms.lm import chunked_token_logps
from rlft_ray.config import RunConfig
from rlft_ray.learners.base import CurvePlot, Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.ddp import wrap_ddp
from rlft_ray.learners.engine import MicroOut, StepEngine, Steps
from rlft_ray.learners.lm_learner import LMLearnerHooks, check_reward_fns
from rlft_ray.learners.lm_rank import LMRank
from rlft_ray.learners.pairwise import LABELLED, probe_labelled
from rlft_ray.lm.ilql_heads import HEADS_PREFIX, ILQLHeads, save_heads
from rlft_ray.lm.labelled import LabelledRows, labelled_tensors
from rlft_ray.lm.pairs import padding_pair, rows_of
from rlft_ray.lm.policy import PolicyWithValueHead, autocast_for, backbone_and_head
from rlft_ray.lm.prompts import ShardStream


class ILQLNet(nn.Module):
    """The LM and its ILQL heads as one module (DDP sees every trainable parameter).

    Args:
        policy: The LM (:class:`~rlft_ray.lm.policy.PolicyWithValueHead`, no value head).
        heads: Its :class:`~rlft_ray.lm.ilql_heads.ILQLHeads`.
    """

    def __init__(self, policy: PolicyWithValueHead, heads: ILQLHeads) -> None:
        super().__init__()
        self.policy, self.heads = policy, heads

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per completion token t (state s_t = prompt + y_<t, action y_t).

        Returns:
            ``logps [B, L]`` log pi(y_t | s_t), ``q1`` / ``q2`` ``[B, L, V]``, ``v [B, L]``
            and the target heads' ``target_q1`` / ``target_q2`` ``[B, L]`` of the action
            (no gradient).
        """
        policy = self.policy
        width = response_ids.shape[1]
        ids = torch.cat([prompt_ids, response_ids[:, :-1]], 1)
        mask = torch.cat([prompt_mask, response_mask[:, :-1]], 1).long()
        with autocast_for(ids.device, policy.compute_dtype):
            hidden = policy._hidden(ids, mask)[:, -width:]
            _, head = backbone_and_head(policy.lm)
            logps, _ = chunked_token_logps(
                hidden, head.weight, head.bias, response_ids, 1.0, policy.chunk_tokens
            )
        q1, q2, v = self.heads(hidden)
        with torch.no_grad():
            h = hidden.detach().float()
            action = response_ids.unsqueeze(-1)
            target_q1 = self.heads.target_q1(h).gather(-1, action).squeeze(-1)
            target_q2 = self.heads.target_q2(h).gather(-1, action).squeeze(-1)
        return {
            "logps": logps.float(),
            "q1": q1,
            "q2": q2,
            "v": v,
            "target_q1": target_q1,
            "target_q2": target_q2,
        }


class ILQLLearner(LMLearnerHooks, Learner):
    """ILQL on one rank's completions; DDP across ranks."""

    scores_samples: ClassVar[bool] = False
    score_metric: ClassVar[str] = "values/advantage_mean"
    curve: ClassVar[CurvePlot] = CurvePlot("loss/q", "counters/iteration", "loss_curve.png")

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = hp = cfg.ilql
        self.core = core = LMRank(cfg, ctx, hp, keep_start=False, temperature=1.0, ddp=False)
        text = core.model.config.get_text_config()
        _, head = backbone_and_head(core.model)
        torch.manual_seed(cfg.seed)  # the heads' initialisation, the same on every rank
        self.heads = ILQLHeads(text.hidden_size, head.weight.shape[0]).to(ctx.device)
        self.ilql_net = ILQLNet(core.policy, self.heads)
        self.net = wrap_ddp(self.ilql_net, ctx)
        params = [p for p in self.ilql_net.parameters() if p.requires_grad]
        core.engine = StepEngine(ctx, self.net, params, hp.optim, core.torch_rng)
        self.optimizer = core.optimizer
        self.rows = ShardStream(
            ctx.datasets.get(LABELLED), hp.batch_size // ctx.world_size, cfg.seed, hp.shuffle
        )

    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        check_reward_fns(cfg)  # lm.eval_fn scores the held-out evaluation
        return probe_labelled(cfg, "reward")

    # -- state -----------------------------------------------------------------------------
    def policy_state(self) -> dict[str, torch.Tensor]:
        """The LM's weights, and with ``lm.decode: ilql`` the heads (for value-guided decoding)."""
        state = self.core.policy_state()
        if self.cfg.lm.decode == "ilql":
            state.update(
                {
                    f"{HEADS_PREFIX}{k}": v.detach().cpu().clone()
                    for k, v in self.heads.state_dict().items()
                }
            )
        return state

    def modules(self) -> dict[str, nn.Module]:
        return {**self.core.modules(), "ilql_heads": self.heads}

    def save_extras(self, path: Path) -> None:
        """Tokenizer and heads go into ``policy/``: ``lm.decode: ilql`` loads them from there."""
        self.core.save_extras(path)
        save_heads(self.heads, Path(path) / "policy")

    def rank_state(self) -> dict[str, np.ndarray]:
        return self.rows.state()

    def load_rank_state(self, state: dict[str, np.ndarray]) -> None:
        self.rows.load_state(state)

    def next_batch(self, version: int) -> LabelledRows:
        return LabelledRows(self.rows.next_rows(), version)

    # -- learning --------------------------------------------------------------------------
    def update(self, batch: LabelledRows, progress: float) -> dict[str, float]:
        hp, dev = self.hp, self.ctx.device
        pad_id = int(self.core.tokenizer.pad_token_id)
        t = labelled_tensors(batch.rows, pad_id, dev)

        def micro_loss(idx: torch.Tensor | None) -> MicroOut:
            if idx is None:
                sub = padding_pair(t, pad_id)
                sub["value"] = torch.zeros(1, device=dev)
                sub["chosen_mask"] = torch.zeros_like(sub["chosen_mask"])  # weighs nothing
            else:
                sub = rows_of(t, idx)
            mask = sub["chosen_mask"]
            out = self.net(sub["prompt_ids"], sub["prompt_mask"], sub["chosen_ids"], mask)
            rewards = token_rewards(sub["value"], None, mask, 0.0)
            terms = ilql_token_losses(
                out["q1"],
                out["q2"],
                out["target_q1"],
                out["target_q2"],
                out["v"],
                rewards,
                sub["chosen_ids"],
                mask,
                hp.gamma,
                hp.tau,
                hp.td_lambda,
            )
            m = mask.float()
            bc = -out["logps"] * m
            if hp.awac_temperature is not None:  # advantage-weighted BC (AWAC)
                adv = torch.minimum(out["target_q1"], out["target_q2"]) - out["v"]
                bc = bc * awac_weights(adv, hp.awac_temperature)
            per_token = (
                terms["q"] + hp.v_coef * terms["v"] + hp.cql_coef * terms["cql"] + hp.bc_coef * bc
            )
            with torch.no_grad():
                action = sub["chosen_ids"].unsqueeze(-1)
                q_a = torch.minimum(out["target_q1"], out["target_q2"])
                q_online = out["q1"].gather(-1, action).squeeze(-1)
                stats = {
                    "loss/q": terms["q"],
                    "loss/v": terms["v"],
                    "loss/cql": terms["cql"],
                    "loss/bc": bc,
                    "values/q_mean": q_online * m,
                    "values/v_mean": out["v"] * m,
                    "values/advantage_mean": (q_a - out["v"]) * m,
                }
            sums = {k: float(v.detach().sum()) for k, v in stats.items()}
            return MicroOut(per_token.sum(), float(m.sum()), sums)

        def denominator(rows: torch.Tensor) -> torch.Tensor:
            return t["chosen_mask"][rows].float().sum()

        steps = Steps(micro_batch_size=hp.micro_batch_size, unit="tokens")
        metrics = self.core.engine.run(
            t["prompt_ids"].shape[0], micro_loss, denominator, steps, progress
        )
        self.heads.sync_targets(hp.polyak)  # after the (one) optimizer step of this batch
        return metrics
