"""What the LM learners (GRPO/RLOO/REINFORCE and token-level PPO) share.

:class:`LMCore` holds a rank's trainable causal LM (plus optional value head), the
frozen reference model, the optimizer and this rank's prompt stream, and runs the
micro-batched optimisation: every optimizer step accumulates gradients over
micro-batches (without DDP all-reduce until the last one) and normalises each
micro-batch loss by the *global* minibatch denominator, so 2 DDP ranks or 4
micro-batches give the same gradient as one rank with the whole batch.

The module-level functions (:func:`probe_lm`, :func:`lm_sampler_kwargs`,
:func:`evaluate_lm`) are the class-level hooks both LM learners expose.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rlft_ray.algorithms.lm import aggregate_loss_parts, kl_penalty, masked_mean, masked_sum
from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.lm.policy import (
    PolicyWithValueHead,
    ResponseOutput,
    make_value_head,
    response_forward,
)
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.types import GenerationBatch, Prompt
from rlft_ray.utils import torch_threads

if TYPE_CHECKING:
    from rlft_ray.learners.base import EvalOptions, Learner, TaskProbe

#: Name of the prompt dataset handed to Ray Train (``LearnerContext.datasets``).
PROMPTS = "prompts"

#: A training objective: (forward output, this micro-batch's tensors) -> per-token loss
#: matrix ``[b, L]`` and per-token statistics to average over real tokens.
TokenLoss = Callable[
    [ResponseOutput, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


# --------------------------------------------------------------------------- class-level hooks


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _hub_available(repo_id: str) -> bool:
    """Whether ``repo_id`` can come from the Hugging Face hub: cached, or the hub answers quickly."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return True
    except Exception:  # cache layout differs: fall through to the network check
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = (
        urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        or "huggingface.co"
    )
    try:
        socket.create_connection((host, 443), timeout=3.0).close()
        return True
    except OSError:
        return False


def resolve_model_path(name: str | None, key: str = "lm.model", required_by: str = "") -> str:
    """A local model/tokenizer directory (``~`` expanded) or a reachable hub id.

    Fails fast, naming ``key``, instead of letting ``from_pretrained`` retry an
    unreachable hub for a minute.

    Raises:
        ConfigError: Unset, a missing local path, or a hub id with no hub to fetch it from.
    """
    if not name:
        raise ConfigError(
            key,
            f"{required_by or 'this run'} needs a causal LM: a local directory or hub id "
            "(build a tiny one with `rlft-ray make-tiny-model out/tiny-gpt2`)",
        )
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return expanded
    hint = (
        " (`rlft-ray quickstart --output-dir runs/q` writes an SFT'd tiny model to runs/q/sft_base; "
        f"`rlft-ray make-tiny-model {name}` builds a random one there)"
    )
    from rlft_ray.lm.tiny import _looks_local

    if _looks_local(name) or not _HUB_ID.fullmatch(name):
        raise ConfigError(key, f"model path does not exist: {name}{hint}")
    if not _hub_available(name):
        raise ConfigError(
            key,
            f"{name!r} is not a local directory and the Hugging Face hub cannot be reached to fetch it{hint}",
        )
    return name


def load_tokenizer(cfg: RunConfig) -> tuple[Any, str | None]:
    """The run's tokenizer with a pad token, and a note when the pad token had to be chosen.

    Raises:
        ConfigError: ``lm.model`` / ``lm.tokenizer`` missing or not loadable.
    """
    from transformers import AutoTokenizer

    from rlft_ray.lm.tiny import PAD_TOKEN

    model = resolve_model_path(cfg.lm.model, required_by=f"algo={cfg.algo}")
    name = resolve_model_path(cfg.lm.tokenizer, "lm.tokenizer") if cfg.lm.tokenizer else model
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.lm.trust_remote_code)
    except Exception as exc:  # OSError, ValueError, ...: one line naming the key
        key = "lm.tokenizer" if cfg.lm.tokenizer else "lm.model"
        raise ConfigError(
            key, f"cannot load a tokenizer from {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    note = None
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
            note = f"tokenizer has no pad token; using eos {tok.eos_token!r} for padding"
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
            note = f"tokenizer has no pad or eos token; added {PAD_TOKEN!r} (embeddings resized)"
    return tok, note


def probe_lm(cfg: RunConfig) -> TaskProbe:
    """Everything about an LM run that can be checked before Ray starts.

    Model and tokenizer load, the prompt file is read and validated (empty and
    over-long prompts dropped/truncated/refused as configured, and counted), the
    reward function imports, and the sizes fit together.

    Raises:
        ConfigError: Naming the key (``lm.model``, ``lm.prompts``, ``lm.reward_fn``, ...).
    """
    from transformers import AutoConfig

    from rlft_ray.learners.base import Spaces, TaskProbe
    from rlft_ray.lm.data import load_prompts
    from rlft_ray.rewards import load_reward_fn

    lm, res = cfg.lm, cfg.resources
    tok, pad_note = load_tokenizer(cfg)
    try:
        model_cfg = AutoConfig.from_pretrained(
            resolve_model_path(lm.model), trust_remote_code=lm.trust_remote_code
        )
    except Exception as exc:
        raise ConfigError(
            "lm.model", f"cannot load a model config from {lm.model!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for key, spec in (("lm.reward_fn", lm.reward_fn), ("lm.eval_fn", lm.eval_fn)):
        try:
            load_reward_fn(spec)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    # Actors are a multiple of learners (RunConfig), so this also splits evenly over ranks.
    if lm.prompts_per_iteration % res.num_rollout_actors:
        raise ConfigError(
            "lm.prompts_per_iteration",
            f"{lm.prompts_per_iteration} prompts cannot be split evenly over "
            f"resources.num_rollout_actors={res.num_rollout_actors}",
        )
    max_pos = getattr(model_cfg, "max_position_embeddings", None) or getattr(
        model_cfg, "n_positions", None
    )
    if max_pos is not None and lm.max_prompt_tokens + lm.max_new_tokens > max_pos:
        raise ConfigError(
            "lm.max_new_tokens",
            f"lm.max_prompt_tokens ({lm.max_prompt_tokens}) + lm.max_new_tokens ({lm.max_new_tokens}) "
            f"exceeds the model's {max_pos} positions",
        )
    if lm.eval_prompts and not Path(lm.eval_prompts).expanduser().is_file():
        raise ConfigError("lm.eval_prompts", f"prompt file not found: {lm.eval_prompts}")
    if not lm.prompts:
        raise ConfigError(
            "lm.prompts",
            f"algo={cfg.algo} needs a prompt file (.jsonl or .parquet with a 'prompt' column)",
        )
    table, stats = load_prompts(lm.prompts, tok, lm)
    if stats.kept < lm.prompts_per_iteration:
        raise ConfigError(
            "lm.prompts_per_iteration",
            f"is {lm.prompts_per_iteration} but only {stats.kept} usable prompts are in {lm.prompts}",
        )
    info: dict[str, Any] = {"env": None, "model": lm.model, **stats.as_dict()}
    if pad_note:
        info["tokenizer_pad"] = pad_note
    spaces = Spaces(
        observation=gym.spaces.Text(max_length=lm.max_prompt_tokens),
        action=gym.spaces.Discrete(len(tok)),
    )
    return TaskProbe(spaces=spaces, datasets={PROMPTS: table}, info=info, cfg=absolute_paths(cfg))


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the ``lm`` section's local paths made absolute (workers have another cwd)."""

    def fix(path: str | None) -> str | None:
        if path and os.path.exists(os.path.expanduser(path)):
            return str(Path(path).expanduser().resolve())
        return path

    lm = dataclasses.replace(
        cfg.lm,
        model=fix(cfg.lm.model),
        tokenizer=fix(cfg.lm.tokenizer),
        prompts=fix(cfg.lm.prompts),
        eval_prompts=fix(cfg.lm.eval_prompts),
    )
    return dataclasses.replace(cfg, lm=lm)


def lm_sampler_kwargs(cfg: RunConfig, index: int) -> dict[str, Any]:
    """Constructor kwargs of generation actor ``index``."""
    gpus = getattr(cfg.resources, "gpus_per_rollout_actor", 0.0)
    return {
        "lm": cfg.lm,
        "seed": cfg.seed + 10_007 * (index + 1),
        "num_threads": torch_threads(cfg.resources.cpus_per_rollout_actor),
        "device": "cuda" if gpus > 0 else "cpu",
    }


def evaluate_lm(checkpoint: Path, cfg: RunConfig, opts: EvalOptions) -> dict[str, Any]:
    """Exact-match (``lm.eval_fn``) accuracy of greedy completions of a checkpoint's policy."""
    from rlft_ray.lm.evaluate import evaluate_model

    dataset = opts.dataset or cfg.lm.eval_prompts
    if not dataset:
        raise ConfigError("--dataset", "name a prompt file (the run config has no lm.eval_prompts)")
    policy_dir = checkpoint / "policy" if (checkpoint / "policy").is_dir() else checkpoint
    result = evaluate_model(policy_dir, dataset, cfg.lm, limit=opts.limit, seed=opts.seed)
    return {"checkpoint": str(checkpoint), **result}


# --------------------------------------------------------------------------- prompts


class PromptStream:
    """Endless batches of prompts from this rank's Ray Data shard, reshuffled every epoch.

    Args:
        shard: ``DataIterator`` (or anything with ``iter_batches``) over the prepared table.
        batch_size: Prompts per :meth:`next` call (this rank's share of an iteration).
        seed: Shuffle seed (epoch ``e`` uses ``seed + e``).
        shuffle: Shuffle within a local buffer each epoch.
    """

    def __init__(self, shard: Any, batch_size: int, seed: int, shuffle: bool) -> None:
        self.shard, self.batch_size, self.seed, self.shuffle = shard, batch_size, seed, shuffle
        self.epoch = 0
        self._it: Iterator[Any] | None = None

    def _epoch_iter(self) -> Iterator[Any]:
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "drop_last": True}
        if self.shuffle:
            kwargs.update(
                local_shuffle_buffer_size=max(4 * self.batch_size, 1024),
                local_shuffle_seed=self.seed + self.epoch,
            )
        return iter(self.shard.iter_batches(**kwargs))

    def next(self) -> list[Prompt]:
        """The next ``batch_size`` prompts (a new epoch starts when the shard runs out)."""
        from rlft_ray.lm.data import prompts_from_batch

        if self.shard is None:
            raise RuntimeError(
                "this learner got no prompt dataset (LearnerContext.datasets['prompts'])"
            )
        for fresh in (False, True):
            if self._it is None or fresh:
                if fresh:
                    self.epoch += 1
                self._it = self._epoch_iter()
            batch = next(self._it, None)
            if batch is not None:
                return prompts_from_batch(batch)
        raise RuntimeError(f"this rank's prompt shard holds fewer than {self.batch_size} prompts")


# --------------------------------------------------------------------------- the core


class LMCore:
    """A rank's LM, reference, optimizer and micro-batched optimisation.

    Args:
        owner: The learner (for its config, context and DDP helpers).
        hp: The algorithm section (``cfg.grpo`` / ``cfg.lm_ppo``): optimizer, clipping,
            epochs, minibatches, micro-batch size, loss aggregation, KL coefficient.
        value_head: Add a scalar value head (PPO).
        value_head_init_std: Its init std (0: zeros).
    """

    def __init__(
        self, owner: Learner, hp: Any, value_head: bool = False, value_head_init_std: float = 0.0
    ) -> None:
        from rlft_ray.lm import quiet_transformers
        from rlft_ray.lm.tiny import load_model_and_tokenizer

        quiet_transformers()
        self.owner, self.cfg, self.ctx, self.hp = owner, owner.cfg, owner.ctx, hp
        lm = self.cfg.lm
        self.model, self.tokenizer = load_model_and_tokenizer(
            resolve_model_path(lm.model),
            trust_remote_code=lm.trust_remote_code,
            tokenizer_path=lm.tokenizer,
        )
        # Eval mode (no dropout, also none inside attention kernels): the learner's log-probs
        # must match the sampler's. Gradients flow the same; weights train in fp32.
        self.model.float().eval()
        _disable_dropout(self.model)
        head = (
            make_value_head(self.model.config.get_text_config().hidden_size, value_head_init_std)
            if value_head
            else None
        )
        self.value_head = head
        self.policy = PolicyWithValueHead(self.model, head)
        self.net = owner.wrap_ddp(self.policy)
        self.reference: nn.Module | None = None
        if hp.kl_coef > 0 or lm.track_kl:
            self.reference = PolicyWithValueHead(
                copy.deepcopy(self.model).requires_grad_(False).eval()
            )
            self.reference.to(self.ctx.device)
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay
        )
        per_rank = lm.prompts_per_iteration // self.ctx.world_size
        self.prompts = PromptStream(
            self.ctx.datasets.get(PROMPTS),
            per_rank,
            self.cfg.seed + 7919 * self.ctx.rank,
            lm.shuffle,
        )
        self.torch_rng = torch.Generator().manual_seed(self.cfg.seed + 104_729 * self.ctx.rank)

    # -- hooks the learners delegate to --------------------------------------------------
    def next_sample_args(self, num_actors: int) -> list[tuple[Any, ...]]:
        """This rank's next prompts, split evenly over its actors."""
        prompts = self.prompts.next()
        size = len(prompts) // num_actors
        return [(prompts[i * size : (i + 1) * size],) for i in range(num_actors)]

    def policy_state(self) -> dict[str, torch.Tensor]:
        """CPU copy of the LM's state dict (what the generation actors load)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def modules(self) -> dict[str, nn.Module]:
        """``policy`` (saved with ``save_pretrained``) and, for PPO, ``value_head``."""
        mods: dict[str, nn.Module] = {"policy": self.model}
        if self.value_head is not None:
            mods["value_head"] = self.value_head
        return mods

    def save_extras(self, path: Path) -> None:
        """The tokenizer goes next to the weights, so ``policy/`` loads with ``from_pretrained``."""
        self.tokenizer.save_pretrained(path / "policy")

    def reset_reference(self) -> None:
        """Make the reference the current policy (after ``init_from`` loaded new weights)."""
        if self.reference is not None:
            self.reference.lm.load_state_dict(self.model.state_dict())

    # -- batches -------------------------------------------------------------------------
    def tensors(self, batch: GenerationBatch) -> dict[str, torch.Tensor]:
        """The batch's arrays as tensors on the learner's device (copies: Ray's arrays are read-only)."""
        dev = self.ctx.device
        return {
            "prompt_ids": torch.tensor(batch.prompt_ids, device=dev),
            "prompt_mask": torch.tensor(batch.prompt_mask, device=dev),
            "response_ids": torch.tensor(batch.response_ids, device=dev),
            "mask": torch.tensor(batch.response_mask, device=dev),
            "old_logprobs": torch.tensor(batch.logprobs, device=dev),
            "rewards": torch.tensor(batch.rewards, device=dev),
        }

    def _micro_slices(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(rows, self.hp.micro_batch_size))

    def forward(
        self, module: nn.Module, t: dict[str, torch.Tensor], idx: torch.Tensor
    ) -> ResponseOutput:
        """:func:`response_forward` of rows ``idx``, trimmed to their longest prompt/response."""
        sub = _trim({k: t[k][idx] for k in ("prompt_ids", "prompt_mask", "response_ids", "mask")})
        return response_forward(
            module,
            sub["prompt_ids"],
            sub["prompt_mask"],
            sub["response_ids"],
            sub["mask"],
            self.cfg.lm.temperature,
        )

    @torch.no_grad()
    def score_pass(
        self, t: dict[str, torch.Tensor], values: bool = False
    ) -> dict[str, torch.Tensor]:
        """Reference log-probs (``ref_logprobs``) and, for PPO, ``old_values`` of the batch.

        Runs in micro-batches without gradients; results are padded back to ``[B, L]``.
        """
        rows = torch.arange(t["mask"].shape[0], device=self.ctx.device)
        out: dict[str, list[torch.Tensor]] = {"ref_logprobs": [], "old_values": []}
        width = t["mask"].shape[1]
        for idx in self._micro_slices(rows):
            if self.reference is not None:
                out["ref_logprobs"].append(
                    _pad_to(self.forward(self.reference, t, idx).logprobs, width)
                )
            if values:
                out["old_values"].append(_pad_to(self.forward(self.policy, t, idx).values, width))
        return {k: torch.cat(v) for k, v in out.items() if v}

    def kl_metrics(
        self, t: dict[str, torch.Tensor], kind: str
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Per-token KL(sampling policy || reference) ``[B, L]`` and its ``kl/*`` metrics."""
        if "ref_logprobs" not in t:
            return None, {}
        kl = kl_penalty(t["old_logprobs"], t["ref_logprobs"], kind).masked_fill(t["mask"] == 0, 0.0)
        k3 = kl_penalty(t["old_logprobs"], t["ref_logprobs"], "k3")
        stats = torch.stack(
            [
                masked_mean(kl, t["mask"]),
                masked_sum(kl, t["mask"], dim=-1).mean(),
                masked_mean(k3, t["mask"]),
            ]
        )
        mean, seq, k3_mean = self.owner.all_reduce_mean(stats).tolist()
        return kl, {"kl/mean": mean, "kl/seq_mean": seq, "kl/k3_mean": k3_mean}

    # -- optimisation --------------------------------------------------------------------
    def set_lr(self, progress: float) -> float:
        """Learning rate after warmup and decay at ``progress`` in [0, 1]; applied to the optimizer."""
        hp = self.hp
        if hp.warmup_fraction > 0 and progress < hp.warmup_fraction:
            factor = progress / hp.warmup_fraction
        else:
            frac = (progress - hp.warmup_fraction) / max(1e-9, 1.0 - hp.warmup_fraction)
            frac = min(max(frac, 0.0), 1.0)
            factor = {
                "constant": 1.0,
                "linear": 1.0 - frac,
                "cosine": 0.5 * (1.0 + math.cos(math.pi * frac)),
            }[hp.lr_schedule]
        lr = hp.lr * factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _global_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def optimize(
        self, t: dict[str, torch.Tensor], token_loss: TokenLoss, progress: float
    ) -> dict[str, float]:
        """``num_epochs`` passes of ``num_minibatches`` optimizer steps over the batch.

        Each step accumulates ``token_loss`` over micro-batches of ``micro_batch_size``
        rows; every micro-batch's loss is its aggregation numerator divided by the
        minibatch's global denominator (times the world size, which DDP's gradient
        averaging divides back out).

        Returns:
            ``loss/*`` (token means of the objective's statistics, grad norm),
            ``optim/*`` and ``perf/learner_tokens_per_s`` metrics.
        """
        hp, world = self.hp, self.ctx.world_size
        lr = self.set_lr(progress)
        rows = t["mask"].shape[0]
        sums: dict[str, float] = {}
        tokens = 0.0
        norms: list[float] = []
        accum = 0
        start = time.perf_counter()
        for _epoch in range(hp.num_epochs):
            perm = torch.randperm(rows, generator=self.torch_rng).to(self.ctx.device)
            for mb in torch.tensor_split(perm, hp.num_minibatches):
                micro = self._micro_slices(mb)
                accum = max(accum, len(micro))
                _, den = aggregate_loss_parts(t["mask"][mb].float(), t["mask"][mb], hp.loss_agg)
                den = self._global_sum(den).clamp_min(1e-8)
                for k, idx in enumerate(micro):
                    last = k == len(micro) - 1
                    sync = contextlib.nullcontext() if last or world == 1 else self.net.no_sync()
                    with sync:
                        out = self.forward(self.net, t, idx)
                        sub = _trim_like(t, idx, out.logprobs.shape[1])
                        loss_mat, stats = token_loss(out, sub)
                        num, _ = aggregate_loss_parts(loss_mat, sub["mask"], hp.loss_agg)
                        loss = num * world / den
                        self.owner.check_finite("loss/total", loss)
                        loss.backward()
                    mask = sub["mask"]
                    n_tok = float(mask.sum())
                    tokens += n_tok
                    stats = {**stats, "entropy": out.entropy}
                    for key, val in stats.items():
                        sums[key] = sums.get(key, 0.0) + float(masked_sum(val.detach(), mask))
                grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), hp.max_grad_norm)
                self.owner.check_finite("loss/grad_norm", grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                norms.append(float(grad_norm))
        elapsed = time.perf_counter() - start
        local = torch.tensor([tokens, *sums.values()], dtype=torch.float64)
        total = self._global_sum(local.to(self.ctx.device)).cpu()
        metrics = {
            f"loss/{k}": float(v / max(float(total[0]), 1.0)) for k, v in zip(sums, total[1:])
        }
        metrics.update(
            {
                "loss/grad_norm": float(np.mean(norms)),
                "optim/lr": lr,
                "optim/steps": float(len(norms)),
                "optim/grad_accum_steps": float(accum),
                "perf/learner_tokens_per_s": float(total[0]) / max(elapsed, 1e-9),
            }
        )
        return metrics

    def reward_metrics(self, t: dict[str, torch.Tensor], group_size: int) -> dict[str, float]:
        """``reward/*`` and ``rollout/*`` statistics over all ranks' completions."""
        r = t["rewards"].float()
        grouped = r.view(-1, group_size)
        flat_groups = (grouped.max(-1).values == grouped.min(-1).values).float().mean()
        lengths = t["mask"].float().sum(-1)
        stats = torch.stack(
            [
                r.mean(),
                (r * r).mean(),
                flat_groups,
                lengths.mean(),
                (lengths >= t["mask"].shape[1]).float().mean(),
            ]
        )
        mean, sq, flat, length, clipped = self.owner.all_reduce_mean(stats).tolist()
        return {
            "reward/mean": mean,
            "reward/std": math.sqrt(max(sq - mean * mean, 0.0)),
            "rollout/flat_group_frac": flat,
            "rollout/response_len_mean": length,
            "rollout/truncated_frac": clipped,
        }


def _disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _trim(sub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop all-padding prompt columns on the left and response columns on the right."""
    p_keep = int(sub["prompt_mask"].any(0).long().argmax()) if sub["prompt_mask"].any() else 0
    r_len = int(sub["mask"].any(0).nonzero().max()) + 1 if sub["mask"].any() else 1
    return {
        "prompt_ids": sub["prompt_ids"][:, p_keep:],
        "prompt_mask": sub["prompt_mask"][:, p_keep:],
        "response_ids": sub["response_ids"][:, :r_len],
        "mask": sub["mask"][:, :r_len],
    }


def _trim_like(
    t: dict[str, torch.Tensor], idx: torch.Tensor, width: int
) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every ``[B, L]`` / ``[B]`` tensor in ``t``, cut to ``width`` tokens."""
    out = {}
    for key, val in t.items():
        if key in ("prompt_ids", "prompt_mask"):
            continue
        v = val[idx]
        out[key] = v[:, :width] if v.dim() == 2 else v
    return out


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def global_masked_whiten(
    owner: Learner, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """:func:`~rlft_ray.algorithms.lm.masked_whiten` with statistics over every rank's tokens."""
    w = mask.float()
    local = torch.stack([(x * w).sum(), (x * x * w).sum(), w.sum()]).double()
    if owner.ctx.world_size > 1:
        dist.all_reduce(local)
    total, sq, n = local.tolist()
    mean = total / max(n, 1.0)
    var = max(sq - n * mean * mean, 0.0) / max(n - 1.0, 1.0)
    return ((x - mean) / math.sqrt(var + eps)).masked_fill(mask == 0, 0.0)


# --------------------------------------------------------------------------- shared hooks


class LMLearnerHooks:
    """The :class:`~rlft_ray.learners.base.Learner` hooks every LM learner shares.

    Mixed in ahead of ``Learner`` (``class GRPOLearner(LMLearnerHooks, Learner)``), so
    inheritance stays one level deep: generation actors feed the learner, checkpoints
    rank by ``reward/mean``, and the per-rank hooks forward to ``self.core``
    (an :class:`LMCore`). Each learner adds its ``__init__`` and ``update``.
    """

    sampler_cls: ClassVar[type] = GenerationActor
    score_metric: ClassVar[str] = "reward/mean"
    curve: ClassVar[tuple[str, str, str]] = (
        "reward/mean",
        "counters/iteration",
        "reward_curve.png",
    )
    core: LMCore

    # -- class-level hooks ---------------------------------------------------------------
    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        return probe_lm(cfg)

    @classmethod
    def sampler_kwargs(cls, cfg: RunConfig, index: int) -> dict[str, Any]:
        return lm_sampler_kwargs(cfg, index)

    @classmethod
    def make_policy(cls, cfg: RunConfig, spaces: Any) -> nn.Module:
        from rlft_ray.lm.tiny import load_model_and_tokenizer

        return load_model_and_tokenizer(cfg.lm.model, cfg.lm.trust_remote_code)[0]

    @classmethod
    def evaluate(cls, checkpoint: Path, cfg: RunConfig, opts: EvalOptions) -> dict[str, Any]:
        return evaluate_lm(checkpoint, cfg, opts)

    # -- per-rank hooks ------------------------------------------------------------------
    def next_sample_args(self, num_actors: int) -> list[tuple[Any, ...]]:
        return self.core.next_sample_args(num_actors)

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self.core.policy_state()

    def modules(self) -> dict[str, nn.Module]:
        return self.core.modules()

    def save_extras(self, path: Path) -> None:
        self.core.save_extras(path)

    def after_init_from(self) -> None:
        self.core.reset_reference()
