"""A Bradley-Terry reward model learned from preference pairs (``algo: reward_model``).

``lm.model`` with a scalar head (``AutoModelForSequenceClassification``, one label)
scores prompt + completion + EOS at one token, ``reward_model.score_at``: the EOS, or the
last content token before it (default: what the classifier pools, the rightmost
non-padding token: the EOS, but the token before it when pad == eos); the position is
saved in the model's ``config.json`` and the scorer reads the same one. The loss is L_BT = -log sigma(r_chosen -
r_rejected - margin) (Ouyang et al. 2022), with ``reward_model.regularizer`` a
regulariser read from the scorer's hidden states through the LM head on the chosen
completion: ``sft``, L_BT + ``sft_coef`` * mean token NLL (``loss/sft``); ``grm``, the GRM
paper's (1 - alpha) L_BT + alpha (-log sigma(beta sum_t log pi)) (Yang et al. 2024;
``loss/grm_reg``; :func:`~rlft_ray.algorithms.preference.grm_losses`). Each
iteration is one optimizer step on
``reward_model.batch_size`` pairs over all ranks (DDP, micro-batched); ``eval_every``
measures the pairwise accuracy on ``lm.eval_pairs`` (``eval/pairwise_accuracy``).
Checkpoints hold ``policy/``, a ``save_pretrained`` directory of the reward model and its
tokenizer, which ``lm.reward_model`` serves through scorer actors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rlft_ray.algorithms import (
    bradley_terry_losses,
    grm_losses,
    grm_sft_regularizer,
    sequence_logps,
)
from rlft_ray.algorithms.lm import selective_log_softmax
from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import (
    CurvePlot,
    EvalOptions,
    Learner,
    LearnerContext,
    Spaces,
    TaskProbe,
)
from rlft_ray.learners.ddp import wrap_ddp
from rlft_ray.learners.engine import StepEngine, Steps
from rlft_ray.learners.lm_rank import disable_dropout
from rlft_ray.learners.pairwise import pair_stream, pair_update, probe_pairs
from rlft_ray.lm.pairs import load_pairs, pair_batch, pair_tensors
from rlft_ray.lm.policy import (
    SCORE_AT_KEY,
    SCORE_EOS_KEY,
    needs_hidden_states,
    position_ids,
    score_reads_at,
)
from rlft_ray.types import PairBatch

#: Name of the held-out pair table every rank receives (``LearnerContext.tables``).
HELDOUT_PAIRS = "heldout_pairs"


def pair_forward(
    model: nn.Module, sub: dict[str, torch.Tensor], hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``[b]`` scores of prompt + chosen and of prompt + rejected, in one forward, and with
    ``hidden`` the ``[b, P + L, H]`` last hidden states of prompt + chosen (the SFT term).

    The prompt is left-padded and the completions right-padded, so positions count from
    each row's first real token; the score is read where ``reward_model.score_at`` says
    (:func:`~rlft_ray.lm.policy.score_reads_at`), as the scorer reads it.
    """
    ids = torch.cat(
        [sub["prompt_ids"].repeat(2, 1), torch.cat([sub["chosen_ids"], sub["rejected_ids"]])], 1
    )
    mask = torch.cat(
        [sub["prompt_mask"].repeat(2, 1), torch.cat([sub["chosen_mask"], sub["rejected_mask"]])], 1
    ).long()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids(mask),
        output_hidden_states=hidden or needs_hidden_states(model),
    )
    b = sub["prompt_ids"].shape[0]
    scores = score_reads_at(model, ids, mask, out)
    return scores[:b], scores[b:], out.hidden_states[-1][:b] if hidden else None


def pair_scores(
    model: nn.Module, sub: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b]`` scores of prompt + chosen and of prompt + rejected, in one forward."""
    chosen, rejected, _ = pair_forward(model, sub)
    return chosen, rejected


def chosen_logps(
    hidden: torch.Tensor, lm_head: nn.Module, sub: dict[str, torch.Tensor], average: bool
) -> torch.Tensor:
    """Log-probability of each chosen completion, read from the scorer's hidden states.

    ``log pi(y_i) = sum_t log softmax(W h_{i, P+t-1})[y_{i,t}]``: the hidden state before
    each completion token, through the LM head ``W``; ``average`` divides by ``|y_i|``.

    Args:
        hidden: ``[b, P + L, H]`` last hidden states of prompt + chosen.
        lm_head: Maps ``[..., H]`` to ``[..., V]`` logits.
        sub: The pair tensors (``prompt_ids`` ``[b, P]``, ``chosen_ids`` / ``chosen_mask`` ``[b, L]``).
        average: Mean over the completion's tokens instead of the sum.

    Returns:
        ``[b]`` log-probabilities.
    """
    p = sub["prompt_ids"].shape[1]
    mask = sub["chosen_mask"]
    logits = lm_head(hidden[:, p - 1 : -1])
    tokens = sub["chosen_ids"].masked_fill(mask == 0, 0)  # an added <pad> may be past the head
    return sequence_logps(selective_log_softmax(logits, tokens), mask, average=average)


def chosen_nll(
    hidden: torch.Tensor, lm_head: nn.Module, sub: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``[b]`` mean token NLL of each chosen completion (the ``sft`` regulariser): the
    negated mean of :func:`chosen_logps`."""
    return -chosen_logps(hidden, lm_head, sub, average=True)


class TiedLMHead(nn.Module):
    """The LM head of a model with tied embeddings: logits = h E^T with the scorer's own
    input embeddings ``E`` (so the SFT term trains them along with the rest)."""

    def __init__(self, embeddings: nn.Embedding) -> None:
        super().__init__()
        self.embeddings = [embeddings]  # a list: not a submodule, E stays the scorer's

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embeddings[0].weight.T


class ScorerWithLMHead(nn.Module):
    """The scorer and an untied model's own LM head as one module, so DDP averages the
    head's gradients too; its forward is the scorer's."""

    def __init__(self, scorer: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.scorer, self.lm_head = scorer, lm_head

    def forward(self, **kwargs: Any) -> Any:
        return self.scorer(**kwargs)


def load_lm_head(cfg: RunConfig, scorer: nn.Module, vocab: int) -> nn.Module:
    """The LM head the SFT term reads hidden states through.

    Tied embeddings: the scorer's input embeddings. Otherwise the causal LM's own output
    layer, loaded from ``lm.model`` once (the sequence classifier drops it), trained with
    the scorer and checkpointed as ``lm_head.safetensors``.
    """
    if getattr(scorer.config, "tie_word_embeddings", False):
        return TiedLMHead(scorer.get_input_embeddings())
    from transformers import AutoModelForCausalLM

    from rlft_ray.lm.loading import resolve_model_path

    causal = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(cfg.lm.model), trust_remote_code=cfg.lm.trust_remote_code
    )
    if vocab > causal.get_input_embeddings().num_embeddings:
        causal.resize_token_embeddings(vocab)
    head = causal.get_output_embeddings()
    if head is None:
        raise ConfigError(
            "reward_model.regularizer",
            f"{cfg.lm.model} has no LM head to read the hidden states",
        )
    return head.float()


class RewardModelLearner(Learner):
    """Bradley-Terry training of a scalar-head LM on one rank's pairs; DDP across ranks."""

    score_metric: ClassVar[str] = "rewards/accuracies"
    eval_metric: ClassVar[str] = "eval/pairwise_accuracy"
    curve: ClassVar[CurvePlot] = CurvePlot("loss/rm", "counters/iteration", "loss_curve.png")

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        from rlft_ray.lm.loading import load_tokenizer

        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.reward_model
        self.tokenizer, _ = load_tokenizer(cfg)
        self.model = self.make_policy(cfg, spaces)
        if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer))  # an added <pad>
        self.model.config.pad_token_id = int(self.tokenizer.pad_token_id)
        # where the score is read, saved in config.json so the scorer reads it there too
        eos = int(self.tokenizer.eos_token_id)
        pad_is_eos = int(self.tokenizer.pad_token_id) == eos
        score_at = self.hp.score_at or ("last_content_token" if pad_is_eos else "eos")
        setattr(self.model.config, SCORE_AT_KEY, score_at)
        setattr(self.model.config, SCORE_EOS_KEY, eos)
        self.model.float().eval()  # no dropout: DDP and micro-batches give one batch's gradient
        disable_dropout(self.model)
        self.lm_head: nn.Module | None = None  # the regulariser's head (sft or grm)
        trained: nn.Module = self.model
        if self.hp.regularizer_used != "none":
            self.lm_head = load_lm_head(cfg, self.model, len(self.tokenizer))
            if self.own_head:
                trained = ScorerWithLMHead(self.model, self.lm_head)
        self.net = wrap_ddp(trained, ctx)
        self.params = list(trained.parameters())
        self.torch_rng = torch.Generator().manual_seed(cfg.seed + 104_729 * ctx.rank)
        self.engine = StepEngine(ctx, self.net, self.params, self.hp.optim, self.torch_rng)
        self.optimizer = self.engine.optimizer
        self.pairs = pair_stream(ctx, self.hp, cfg.seed)
        self.heldout = ctx.tables.get(HELDOUT_PAIRS)

    @property
    def own_head(self) -> bool:
        """An untied model's own LM head, trained and checkpointed beside the scorer."""
        return self.lm_head is not None and not isinstance(self.lm_head, TiedLMHead)

    # -- class-level hooks ---------------------------------------------------------------
    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        if cfg.lm.lora.enabled:
            raise ConfigError(
                "lm.lora.r",
                "algo=reward_model trains the whole classifier; LoRA is for the policy "
                "learners (grpo, lm_ppo, rsft, dpo, online_dpo): set lm.lora.r=0",
            )
        if cfg.eval_every is not None and not cfg.lm.eval_pairs:
            raise ConfigError("eval_every", "the reward model's evaluation needs lm.eval_pairs")

        def tables_for(tok: Any) -> dict[str, Any]:
            if cfg.eval_every is None:
                return {}
            return {HELDOUT_PAIRS: load_pairs(cfg.lm.eval_pairs, tok, cfg.lm, "lm.eval_pairs")[0]}

        hp = cfg.reward_model
        return probe_pairs(cfg, hp.batch_size, hp.num_epochs, tables_for)

    @classmethod
    def make_policy(cls, cfg: RunConfig, spaces: Spaces | None) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        from rlft_ray.lm import quiet_transformers
        from rlft_ray.lm.loading import fuse_activations, resolve_model_path

        quiet_transformers()
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(cfg.lm.model),
            num_labels=1,
            trust_remote_code=cfg.lm.trust_remote_code,
        )
        fuse_activations(model)
        return model

    @classmethod
    def evaluate(cls, checkpoint: Path, cfg: RunConfig, opts: EvalOptions) -> dict[str, Any]:
        """``rlft-ray eval CKPT --dataset pairs.jsonl``: pairwise accuracy on held-out pairs."""
        from rlft_ray.rollout.scoring import RewardModelScorer

        dataset = opts.dataset or cfg.lm.eval_pairs
        if not dataset:
            raise ConfigError("--dataset", "name a pair file (the run config has no lm.eval_pairs)")
        scorer = RewardModelScorer(str(checkpoint))
        table, stats = load_pairs(dataset, scorer.tokenizer, cfg.lm, "--dataset")
        if opts.limit is not None:
            table = table.iloc[: opts.limit]
        acc, margin = pairwise_accuracy(scorer.model, table, scorer.pad_id)
        return {
            "checkpoint": str(checkpoint),
            "dataset": str(dataset),
            "pairs": len(table),
            "pairwise_accuracy": acc,
            "margin_mean": margin,
            **{k: v for k, v in stats.as_dict().items() if k != "pairs/source"},
        }

    # -- per-rank hooks ------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        if self.own_head:
            return {"policy": self.model, "lm_head": self.lm_head}
        return {"policy": self.model}

    def save_extras(self, path: Path) -> None:
        self.tokenizer.save_pretrained(path / "policy")

    def policy_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def rank_state(self) -> dict[str, np.ndarray]:
        return self.pairs.state()  # --resume goes on where the data stream was

    def load_rank_state(self, state: dict[str, np.ndarray]) -> None:
        self.pairs.load_state(state)

    def next_batch(self, version: int) -> PairBatch:
        return pair_batch(self.pairs.next_rows(), int(self.tokenizer.pad_token_id), version)

    def heldout_eval(self, runners: Any, version: int) -> dict[str, float]:
        """Pairwise accuracy on ``lm.eval_pairs``, on this rank (a forward pass per pair)."""
        if self.heldout is None:
            return {}
        acc, margin = pairwise_accuracy(self.model, self.heldout, int(self.tokenizer.pad_token_id))
        return {"eval/pairwise_accuracy": acc, "eval/margin_mean": margin}

    def update(self, batch: PairBatch, progress: float) -> dict[str, float]:
        hp = self.hp

        def loss(sub: dict[str, torch.Tensor], weight: torch.Tensor) -> Any:
            chosen, rejected, hidden = pair_forward(self.net, sub, hidden=self.lm_head is not None)
            losses = bradley_terry_losses(chosen, rejected, hp.margin)
            total = (losses * weight).sum()
            stats = {
                "loss/rm": losses.detach(),
                "rewards/chosen": chosen.detach(),
                "rewards/rejected": rejected.detach(),
                "rewards/accuracies": (chosen > rejected).float(),
                "rewards/margins": (chosen - rejected).detach(),
            }
            if hidden is not None and self.lm_head is not None:
                if hp.regularizer_used == "grm":  # (1 - a) L_BT + a L_reg, summed log pi
                    logps = chosen_logps(hidden, self.lm_head, sub, average=False)
                    reg = grm_sft_regularizer(logps, hp.grm_beta)
                    total = (grm_losses(losses, reg, hp.grm_alpha) * weight).sum()
                    stats["loss/grm_reg"] = reg.detach()
                else:  # sft: L_BT + c * mean token NLL
                    nll = chosen_nll(hidden, self.lm_head, sub)
                    total = total + hp.sft_coef * (nll * weight).sum()
                    stats["loss/sft"] = nll.detach()
            return total, stats

        t = pair_tensors(batch, self.ctx.device)
        steps = Steps(micro_batch_size=hp.micro_batch_size, unit="pairs")  # one step per batch
        pad_id = int(self.tokenizer.pad_token_id)
        return pair_update(self.engine, t, loss, pad_id=pad_id, steps=steps, progress=progress)


@torch.no_grad()
def pairwise_accuracy(
    model: nn.Module, table: Any, pad_id: int, micro: int = 64
) -> tuple[float, float]:
    """Fraction of pairs whose chosen completion outscores the rejected one, and the mean margin."""
    wins, margins = [], []
    device = next(model.parameters()).device
    for start in range(0, len(table), micro):
        sub = pair_tensors(pair_batch(table.iloc[start : start + micro], pad_id), device)
        chosen, rejected = pair_scores(model, sub)
        wins.append((chosen > rejected).float().cpu().numpy())
        margins.append((chosen - rejected).cpu().numpy())
    if not wins:
        return math.nan, math.nan
    return float(np.concatenate(wins).mean()), float(np.concatenate(margins).mean())
