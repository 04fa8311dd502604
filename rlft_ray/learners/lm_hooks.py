"""The Learner hooks every LM learner (GRPO/RLOO/REINFORCE, token PPO) shares.

Class-level hooks run on the driver before Ray starts (:func:`probe_lm` checks the
model, tokenizer, prompt file and reward function) or build the generation actors
(:func:`lm_sampler_kwargs`); :class:`LMLearnerHooks` forwards the per-rank hooks to
the learner's :class:`~rlft_ray.learners.lm_core.LMCore`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import EvalOptions, Spaces, TaskProbe
from rlft_ray.learners.lm_core import HELDOUT, PROMPTS, LMCore
from rlft_ray.lm.data import load_prompts
from rlft_ray.lm.loading import load_tokenizer, resolve_model_path
from rlft_ray.rewards import load_reward_fn
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.utils import torch_threads


def probe_lm(cfg: RunConfig) -> TaskProbe:
    """Everything about an LM run that can be checked before Ray starts.

    Model and tokenizer load, the prompt file is read and validated (empty and
    over-long prompts dropped/truncated/refused as configured, and counted), the
    reward function imports, and the sizes fit together.

    Raises:
        ConfigError: Naming the key (``lm.model``, ``lm.prompts``, ``lm.reward_fn``, ...).
    """
    from transformers import AutoConfig

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
    tables = {}
    if cfg.eval_every is not None:
        if not lm.eval_prompts:
            raise ConfigError("eval_every", "held-out evaluation needs lm.eval_prompts")
        tables[HELDOUT], _ = load_prompts(lm.eval_prompts, tok, lm, key="lm.eval_prompts")
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
    return TaskProbe(
        spaces=spaces,
        datasets={PROMPTS: table},
        tables=tables,
        info=info,
        cfg=absolute_paths(cfg),
    )


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
        from rlft_ray.lm.loading import load_model_and_tokenizer

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

    def load_start_point(self, path: Path) -> None:
        self.core.load_start_point(path)

    def heldout_requests(self, num_actors: int) -> list[tuple[Any, ...]] | None:
        prompts = self.core.heldout
        if not prompts:
            return None
        size = -(-len(prompts) // num_actors)  # ceil: every prompt is scored once
        return [(prompts[i * size : (i + 1) * size],) for i in range(num_actors)]

    def heldout_metrics(self, results: list[Any]) -> dict[str, float]:
        scores = np.concatenate([np.asarray(r, dtype=np.float64) for r in results])
        return {"eval/accuracy": float(scores.mean()) if len(scores) else 0.0}
