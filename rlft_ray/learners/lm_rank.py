"""A rank's LM, frozen reference and step engine (shared by every LM learner).

:class:`LMRank` loads the policy (and LoRA adapters, a value head, a frozen reference),
turns a batch into tensors, runs the no-gradient scoring pass (reference log-probs, old
values), and hands token objectives to the one :class:`~rlft_ray.learners.engine.StepEngine`
(:meth:`LMRank.optimize`); the pair learners use :attr:`LMRank.engine` directly.
The learner supplies only its per-token objective (:data:`TokenLoss`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlft_ray.algorithms import aggregate_loss_parts, kl_penalty, masked_mean, masked_sum
from rlft_ray.config import RunConfig
from rlft_ray.core.torch_utils import distinct_tensors
from rlft_ray.learners.ddp import LearnerContext, all_reduce_mean, wrap_ddp
from rlft_ray.learners.engine import MicroOut, StepEngine, Steps, micro_batches
from rlft_ray.learners.lm_batches import pad_to, padding_row, row_tokens, rows_cut_to, trim_padding
from rlft_ray.lm.loading import (
    enable_gradient_checkpointing,
    load_model_and_tokenizer,
    resolve_model_path,
)
from rlft_ray.lm.lora import LoRAReference, adapter_state, adapter_tensors, apply_lora
from rlft_ray.lm.policy import (
    PolicyWithValueHead,
    ResponseOutput,
    make_value_head,
    response_forward,
)
from rlft_ray.lm.prompts import PromptStream, prompts_from_batch
from rlft_ray.types import GenerationBatch

logger = logging.getLogger(__name__)

#: Name of the prompt dataset handed to Ray Train (``LearnerContext.datasets``).
PROMPTS = "prompts"
#: Name of the held-out prompt table every rank receives (``LearnerContext.tables``).
HELDOUT = "heldout_prompts"

#: A training objective: (forward output, this micro-batch's tensors) -> per-token loss
#: matrix ``[b, L]`` and per-token statistics to average over real tokens.
TokenLoss = Callable[
    [ResponseOutput, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


class LMRank:
    """A rank's LM, reference, optimizer and micro-batched optimisation.

    Args:
        cfg: The run config (``cfg.lm``: model, tokenizer, sampling temperature, prompts).
        ctx: This rank's context (rank, world size, device, prompt shard).
        hp: The algorithm section (``cfg.grpo``, ``cfg.dpo``, ...): its ``optim``, and for
            token objectives its epochs, minibatches, micro-batch size and loss aggregation.
        keep_start: Keep a frozen copy of the starting weights (``reference``): the KL
            reference, and what RSFT's ``reset_to_base`` resets to.
        reference_reported_only: Nothing but a reported KL (``lm.track_kl`` with a KL
            coefficient of 0) reads the reference: a full model keeps it in bfloat16, half
            the memory of a float32 copy (the reported ``kl/*`` within bf16 rounding).
        value_head: Add a scalar value head (PPO).
        value_head_init_std: Its init std (0: zeros).
        temperature: Logits are divided by it in the training forward pass; None:
            ``lm.temperature``, so log-probs are those of the sampling policy (the PPO/GRPO
            ratio needs them); RSFT passes 1.0 to fit the model itself.
        ddp: Wrap the policy in DDP with several ranks; False for a learner that wraps a
            larger module holding it (ILQL's LM + heads) and builds its own engine.
    """

    def __init__(
        self,
        cfg: RunConfig,
        ctx: LearnerContext,
        hp: Any,
        keep_start: bool,
        reference_reported_only: bool = False,
        value_head: bool = False,
        value_head_init_std: float = 0.0,
        temperature: float | None = None,
        ddp: bool = True,
    ) -> None:
        from rlft_ray.lm import quiet_transformers

        quiet_transformers()
        self.cfg, self.ctx, self.hp = cfg, ctx, hp
        lm = cfg.lm
        self.temperature = lm.temperature if temperature is None else temperature
        self.save_reference = False  # set by learners whose reference moves (checkpointed then)
        self.model, self.tokenizer = load_model_and_tokenizer(
            resolve_model_path(lm.model),
            trust_remote_code=lm.trust_remote_code,
            tokenizer_path=lm.tokenizer,
        )
        # Eval mode (no dropout, also none inside attention kernels): the learner's log-probs
        # must match the sampler's. Gradients flow the same; weights train in fp32.
        self.model.float().eval()
        disable_dropout(self.model)
        hidden = self.model.config.get_text_config().hidden_size
        self.lora = lm.lora.enabled
        if self.lora:  # only the adapters train; the base weights stay as loaded
            self.model = apply_lora(self.model, lm.lora, base_path=resolve_model_path(lm.model))
        if lm.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.value_head = make_value_head(hidden, value_head_init_std) if value_head else None
        self.policy = PolicyWithValueHead(self.model, self.value_head, lm.logit_chunk_tokens)
        # a bf16 run computes in bf16 over float32 master weights, as its actors sample
        self.policy.compute_dtype = torch.bfloat16 if lm.dtype == "bfloat16" else None
        self.net = wrap_ddp(self.policy, ctx) if ddp else self.policy.to(ctx.device)
        self.reference: nn.Module | None = None
        if keep_start and self.lora:
            self.reference = LoRAReference(self.policy)  # adapters off: no second model
        elif keep_start:
            frozen = copy.deepcopy(self.model).requires_grad_(False).eval()
            reported_only = reference_reported_only and ctx.device.type == "cpu"
            if reported_only:
                frozen.to(torch.bfloat16)
            self.reference = PolicyWithValueHead(frozen, None, lm.logit_chunk_tokens)
            self.reference.compute_dtype = (
                torch.bfloat16 if reported_only else self.policy.compute_dtype
            )
            self.reference.to(ctx.device)
        self.lora_start = adapter_state(self.model) if self.lora else {}
        self.score_passes = 0  # the cadence of a KL that is only reported (track_kl_every)
        self.torch_rng = torch.Generator().manual_seed(cfg.seed + 104_729 * ctx.rank)
        self.engine = StepEngine(ctx, self.net, self.trainable(), hp.optim, self.torch_rng)
        self.prompts = PromptStream(
            ctx.datasets.get(PROMPTS),
            lm.prompts_per_iteration // ctx.world_size,
            cfg.seed,  # shared: one global order over the ranks (TableShard)
            lm.shuffle,
        )
        heldout = ctx.tables.get(HELDOUT)
        self.heldout = prompts_from_batch(heldout) if heldout is not None else []

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The engine's AdamW over :meth:`trainable` (the learner checkpoints its state)."""
        return self.engine.optimizer

    def trainable(self) -> list[nn.Parameter]:
        """What the optimizer steps: every parameter, or with LoRA the adapters (and value head)."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    # -- hooks the learners delegate to --------------------------------------------------
    def next_sample_args(self, num_actors: int) -> list[tuple[Any, ...]]:
        """This rank's next prompts, split evenly over its actors."""
        prompts = self.prompts.next()
        size = len(prompts) // num_actors
        return [(prompts[i * size : (i + 1) * size],) for i in range(num_actors)]

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The LM's state dict as CPU tensors in the published dtype (what the generation
        actors load); with LoRA only the adapter tensors (the actors hold the same base
        model). Tensors already on the CPU in that dtype are the parameters themselves,
        not copies: the publish copies them at once (into the shared file or the object
        store), and a copy here was a second model in the learner's peak memory. Clone
        them to keep a snapshot across an update."""
        if self.lora:
            return adapter_state(self.model)
        state = distinct_tensors(self.model.state_dict())  # tied weights once
        return {k: v.detach().to("cpu", self.publish_dtype(v)) for k, v in state.items()}

    def publish_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        """The dtype the actors sample in (``lm.dtype``) for floating weights: a bf16 run
        publishes half the bytes; the learner keeps its float32 master weights."""
        if tensor.is_floating_point() and self.cfg.lm.dtype in ("bfloat16", "float16"):
            return getattr(torch, self.cfg.lm.dtype)
        return tensor.dtype

    def modules(self) -> dict[str, nn.Module]:
        """``policy`` (saved with ``save_pretrained``), for PPO ``value_head``, and the
        ``reference`` when it moves during the run (online DPO's refreshes)."""
        mods: dict[str, nn.Module] = {"policy": self.model}
        if self.value_head is not None:
            mods["value_head"] = self.value_head
        if self.save_reference and self.reference is not None:
            # with LoRA the reference's state is its adapters (reference.safetensors)
            mods["reference"] = self.reference if self.lora else self.reference.lm
        return mods

    def save_extras(self, path: Path) -> None:
        """The tokenizer goes next to the weights, so ``policy/`` loads with ``from_pretrained``."""
        self.tokenizer.save_pretrained(path / "policy")

    def reset_reference(self) -> None:
        """Make the reference the current policy (after ``init_from`` loaded new weights)."""
        if isinstance(self.reference, LoRAReference):
            self.reference.set_from_policy()
        elif self.reference is not None:
            self.reference.lm.load_state_dict(self.model.state_dict())

    def load_start_point(self, path: Path) -> None:
        """On ``--resume`` of an ``init_from`` run: the reference is ``init_from``'s policy,
        not ``lm.model`` (the checkpoint then loads the trained weights into the policy)."""
        from rlft_ray.learners.checkpoint import load_modules

        if isinstance(self.reference, LoRAReference):
            self.reference.load_adapter_dir(Path(path) / "policy")
        elif self.reference is not None:
            load_modules(path, {"policy": self.reference.lm})

    def reset_to_start(self) -> None:
        """The policy back to the starting weights, with a fresh optimizer (RSFT's
        ``reset_to_base``); the caller re-points the learner at :attr:`optimizer`."""
        if self.reference is None:
            raise RuntimeError("reset_to_start needs keep_start=True")
        if isinstance(self.reference, LoRAReference):
            start = self.reference.adapters or self.lora_start
            with torch.no_grad():
                for name, param in adapter_tensors(self.model).items():
                    param.copy_(start[name])
        else:
            self.model.load_state_dict(self.reference.lm.state_dict())
        self.engine.reset_optimizer()

    # -- batches -------------------------------------------------------------------------
    def tensors(self, batch: GenerationBatch) -> dict[str, torch.Tensor]:
        """The batch's arrays as tensors on the learner's device (copies: Ray's arrays are read-only)."""
        dev = self.ctx.device
        out = {
            "prompt_ids": torch.tensor(batch.prompt_ids, device=dev),
            "prompt_mask": torch.tensor(batch.prompt_mask, device=dev),
            "response_ids": torch.tensor(batch.response_ids, device=dev),
            "mask": torch.tensor(batch.train_mask, device=dev),
            "old_logprobs": torch.tensor(batch.logprobs, device=dev),
            "rewards": torch.tensor(batch.rewards, device=dev),
        }
        if batch.loss_mask is not None:  # multi-turn: the env's tokens are attended, not trained
            out["attn_mask"] = torch.tensor(batch.response_mask, device=dev)
        if batch.step_rewards is not None:
            out["step_rewards"] = torch.tensor(batch.step_rewards, device=dev)
        return out

    def _steps(self) -> Steps:
        """How the section's updates walk a batch (the score pass uses its micro-batches)."""
        hp = self.hp
        return Steps(
            hp.num_epochs,
            hp.num_minibatches,
            hp.micro_batch_size,
            keep_order=True,
            micro_batch_tokens=self.cfg.lm.micro_batch_tokens,
        )

    def forward(
        self,
        module: nn.Module,
        tensors: dict[str, torch.Tensor],
        idx: torch.Tensor,
        entropy: bool = True,
    ) -> ResponseOutput:
        """:func:`response_forward` of rows ``idx``, trimmed to their longest prompt/response.

        Completions of one prompt share its pass unless the module must return values.
        The response attends to ``attn_mask`` where the batch has one (multi-turn: the
        environment's tokens too), else to ``mask``.
        """
        sub = trim_padding(
            {k: tensors[k][idx] for k in ("prompt_ids", "prompt_mask", "response_ids")}
            | {"mask": tensors.get("attn_mask", tensors["mask"])[idx]}
        )
        return response_forward(
            module,
            sub["prompt_ids"],
            sub["prompt_mask"],
            sub["response_ids"],
            sub["mask"],
            self.temperature,
            entropy=entropy,
            # a checkpointed layer would append to a shared cache again when recomputed
            share_prompts=(self.value_head is None or module is self.reference)
            and not self.cfg.lm.gradient_checkpointing,
        )

    @torch.no_grad()
    def score_pass(
        self,
        tensors: dict[str, torch.Tensor],
        values: bool = False,
        kl_in_objective: bool = True,
        learner_logprobs: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Reference log-probs (``ref_logprobs``), for PPO ``old_values``, and with
        ``learner_logprobs`` the policy's own log-probs of the sampled tokens before the
        update (``learner_logprobs``: what the sampler's recorded ones should equal).

        Runs in micro-batches without gradients; results are padded back to ``[B, L]``.
        A KL the objective does not use (``kl_in_objective`` False: a coefficient of 0) is
        only reported, so its reference forward runs on every ``lm.track_kl_every``-th call
        (the first included); the other calls return no ``ref_logprobs``. The count is
        this rank's calls, the same on every rank (each updates once per iteration).
        """
        due = kl_in_objective or self.score_passes % self.cfg.lm.track_kl_every == 0
        self.score_passes += 1
        reference = self.reference if due else None
        rows = torch.arange(tensors["mask"].shape[0], device=self.ctx.device)
        out: dict[str, list[torch.Tensor]] = {
            "ref_logprobs": [],
            "old_values": [],
            "learner_logprobs": [],
        }
        width = tensors["mask"].shape[1]
        for idx in micro_batches(rows, self._steps(), row_tokens(tensors)):
            if reference is not None:
                ref = self.forward(reference, tensors, idx, entropy=False)
                out["ref_logprobs"].append(pad_to(ref.logprobs, width))
            if values or learner_logprobs:
                old = self.forward(self.policy, tensors, idx, entropy=False)
                if values:
                    out["old_values"].append(pad_to(old.values, width))
                if learner_logprobs:
                    out["learner_logprobs"].append(pad_to(old.logprobs, width))
        return {k: torch.cat(v) for k, v in out.items() if v}

    @torch.no_grad()
    def learner_logprob_pass(
        self, tensors: dict[str, torch.Tensor], active: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``learner_logprobs`` ``[B, L]``: the policy's own log-probs of the sampled
        tokens before the update, on the rows the update runs (``active`` ``[B]`` bool;
        None: all); the others keep the sampler's (a gap of 0, TIS weights of 1). A row
        the update skips (a group scored alike) has no gradient for TIS to weight, and
        its forward would double the pass's cost behind a vLLM sampler, where most groups
        of a hard task score alike."""
        logprobs = tensors["old_logprobs"].clone()
        rows = torch.arange(logprobs.shape[0], device=self.ctx.device)
        if active is not None:
            rows = rows[active]
        for idx in micro_batches(rows, self._steps(), row_tokens(tensors)) if len(rows) else []:
            old = self.forward(self.policy, tensors, idx, entropy=False)
            logprobs[idx, : old.logprobs.shape[1]] = old.logprobs
        return {"learner_logprobs": logprobs}

    def recomputes_logprobs(self, tis_cap: float | None) -> bool:
        """Whether the update needs the learner's log-probs of the sampled tokens before
        it: for truncated importance sampling, and always behind a vLLM sampler (to report
        the gap; :mod:`~rlft_ray.learners.sampler_gap`)."""
        return tis_cap is not None or self.cfg.lm.backend == "vllm"

    def single_step(self) -> bool:
        """Whether an update is one optimizer step (one epoch of one minibatch): its
        forward then runs on the weights the update starts from (what a pass before it
        would read), and gives the learner's log-probs itself (:class:`~rlft_ray.learners.sampler_gap.InlineMismatch`)."""
        return self.hp.num_epochs * self.hp.num_minibatches == 1

    def kl_metrics(
        self, tensors: dict[str, torch.Tensor], kind: str
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Per-token KL(sampling policy || reference) ``[B, L]`` and its ``kl/*`` metrics."""
        if "ref_logprobs" not in tensors:
            return None, {}
        kl = kl_penalty(tensors["old_logprobs"], tensors["ref_logprobs"], kind).masked_fill(
            tensors["mask"] == 0, 0.0
        )
        k3 = kl_penalty(tensors["old_logprobs"], tensors["ref_logprobs"], "k3")
        stats = torch.stack(
            [
                masked_mean(kl, tensors["mask"]),
                masked_sum(kl, tensors["mask"], dim=-1).mean(),
                masked_mean(k3, tensors["mask"]),
            ]
        )
        mean, seq, k3_mean = all_reduce_mean(stats, self.ctx).tolist()
        return kl, {"kl/mean": mean, "kl/seq_mean": seq, "kl/k3_mean": k3_mean}

    # -- optimisation --------------------------------------------------------------------
    def optimize(
        self,
        tensors: dict[str, torch.Tensor],
        token_loss: TokenLoss,
        progress: float,
        active: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """The section's epochs x minibatches of optimizer steps on a token objective.

        A micro-batch's loss numerator is ``token_loss`` aggregated by ``loss_agg``; the
        minibatch denominator is its tokens under the same aggregation, over all ranks.
        A rank without rows of a minibatch runs a zero-weight padding row. Rows outside
        ``active`` (``[B]`` bool: rows whose ``token_loss`` is exactly zero) count in
        the denominator and are never run (:meth:`StepEngine.run`).

        Returns:
            ``loss/*`` (token means of the objective's statistics and the entropy, grad
            norm), ``optim/*`` and ``perf/learner_tokens_per_s`` metrics.
        """
        hp, max_new = self.hp, self.cfg.lm.max_new_tokens
        pad_row = padding_row(tensors, self.tokenizer.pad_token_id)
        stand_in = torch.zeros(1, dtype=torch.long, device=self.ctx.device)

        def denominator(rows: torch.Tensor) -> torch.Tensor:
            mask = tensors["mask"][rows]
            return aggregate_loss_parts(mask.float(), mask, hp.loss_agg, max_new)[1]

        def micro_loss(idx: torch.Tensor | None) -> MicroOut:
            rows, idx = (tensors, idx) if idx is not None else (pad_row, stand_in)
            out = self.forward(self.net, rows, idx)
            sub = rows_cut_to(rows, idx, out.logprobs.shape[1])
            loss_mat, stats = token_loss(out, sub)
            num, _ = aggregate_loss_parts(loss_mat, sub["mask"], hp.loss_agg, max_new)
            mask = sub["mask"]
            sums = {
                f"loss/{key}": float(masked_sum(val.detach(), mask))
                for key, val in {**stats, "entropy": out.entropy}.items()
            }
            return MicroOut(num, float(mask.sum()), sums)

        rows = tensors["mask"].shape[0]
        return self.engine.run(
            rows, micro_loss, denominator, self._steps(), progress, row_tokens(tensors), active
        )

    def reward_metrics(self, tensors: dict[str, torch.Tensor], group_size: int) -> dict[str, float]:
        """``reward/*`` and ``rollout/*`` statistics over all ranks' completions."""
        r = tensors["rewards"].float()
        grouped = r.view(-1, group_size)
        flat_groups = (grouped.max(-1).values == grouped.min(-1).values).float().mean()
        lengths = tensors["mask"].float().sum(-1)
        stats = torch.stack(
            [
                r.mean(),
                (r * r).mean(),
                flat_groups,
                lengths.mean(),
                (lengths >= tensors["mask"].shape[1]).float().mean(),
            ]
        )
        mean, sq, flat, length, clipped = all_reduce_mean(stats, self.ctx).tolist()
        return {
            "reward/mean": mean,
            "reward/std": math.sqrt(max(sq - mean * mean, 0.0)),
            "rollout/flat_group_frac": flat,
            "rollout/response_len_mean": length,
            "rollout/truncated_frac": clipped,
        }


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (also inside attention): training and sampling see one model."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
