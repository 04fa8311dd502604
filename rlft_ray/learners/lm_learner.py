"""The Learner hooks every LM learner (GRPO/RLOO/REINFORCE, token PPO) shares.

Class-level hooks run on the driver before Ray starts (:func:`probe_lm` checks the
model, tokenizer, prompt file and reward function) or build the generation actors
(:func:`lm_sampler_kwargs`); :class:`LMLearnerHooks` forwards the per-rank hooks to
the learner's :class:`~rlft_ray.learners.lm_rank.LMRank`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlft_ray.algorithms.pass_at_k import sample_metrics
from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.core.torch_utils import torch_threads
from rlft_ray.learners.base import CurvePlot, EvalOptions, Spaces, TaskProbe
from rlft_ray.learners.lm_rank import HELDOUT, PROMPTS, LMRank
from rlft_ray.lm.loading import load_tokenizer, resolve_model_path
from rlft_ray.lm.lora import check_lora
from rlft_ray.lm.prompts import load_prompts, prompts_from_batch
from rlft_ray.rewards import compute_rewards, load_reward_fn
from rlft_ray.types import Prompt

logger = logging.getLogger(__name__)


def probe_lm(cfg: RunConfig, training: bool = True) -> TaskProbe:
    """Everything about a sampling LM run that can be checked before Ray starts.

    Model and tokenizer load, the prompt file is read and validated (empty and
    over-long prompts dropped/truncated/refused as configured, and counted), the
    reward function imports, and the sizes fit together.

    Args:
        cfg: The run config.
        training: Also check what only a training run uses (``lm.prompts_per_iteration``
            against the prompts and actors); ``rlft-ray sample`` passes False.

    Raises:
        ConfigError: Naming the key (``lm.model``, ``lm.prompts``, ``lm.reward_fn``, ...).
    """
    from rlft_ray.learners.agent_probe import agent_mode, probe_agent

    if agent_mode(cfg):  # no prompt file: an LM agent in the text environment env
        return probe_agent(cfg, training)
    lm, res = cfg.lm, cfg.resources
    tok, info = check_model(cfg, lm.max_new_tokens, "lm.max_new_tokens")
    check_reward_fns(cfg)
    # Actors are a multiple of learners (RunConfig), so this also splits evenly over ranks.
    if training and lm.prompts_per_iteration % res.num_rollout_actors:
        raise ConfigError(
            "lm.prompts_per_iteration",
            f"{lm.prompts_per_iteration} prompts cannot be split evenly over "
            f"resources.num_rollout_actors={res.num_rollout_actors}",
        )
    if not lm.prompts:
        raise ConfigError(
            "lm.prompts",
            f"algo={cfg.algo} needs a prompt file (.jsonl or .parquet with a 'prompt' column)",
        )
    table, stats = load_prompts(lm.prompts, tok, lm)
    if stats.overlong_dropped or stats.truncated:
        logger.warning(
            "lm.max_prompt_tokens=%d: %s (lm.prompt_overflow=%s)",
            lm.max_prompt_tokens,
            stats.describe(),
            lm.prompt_overflow,
        )
    warn_unusual_lr(cfg, info.get("parameters"))
    check_reward_call(cfg, prompts_from_batch(table.head(1))[0])
    if training and stats.kept < lm.prompts_per_iteration:
        raise ConfigError(
            "lm.prompts_per_iteration",
            f"is {lm.prompts_per_iteration} but only {stats.kept} usable prompts are in {lm.prompts}",
        )
    return TaskProbe(
        spaces=lm_spaces(cfg, tok),
        datasets={PROMPTS: table},
        tables=heldout_tables(cfg, tok),
        info={**info, **stats.as_dict()},
        cfg=absolute_paths(cfg),
    )


def check_model(cfg: RunConfig, new_tokens: int, new_key: str) -> tuple[Any, dict[str, Any]]:
    """The tokenizer, and ``summary.json`` notes, once model and tokenizer load and
    ``lm.max_prompt_tokens`` + ``new_tokens`` fit the model's positions.

    Raises:
        ConfigError: ``lm.model`` / ``lm.tokenizer`` missing or unloadable, or ``new_key``
            too long for the model.
    """
    from transformers import AutoConfig

    lm = cfg.lm
    tok, pad_note = load_tokenizer(cfg)
    try:
        model_cfg = AutoConfig.from_pretrained(
            resolve_model_path(lm.model), trust_remote_code=lm.trust_remote_code
        )
    except Exception as exc:
        raise ConfigError(
            "lm.model", f"cannot load a model config from {lm.model!r}: {type(exc).__name__}: {exc}"
        ) from exc
    max_pos = getattr(model_cfg, "max_position_embeddings", None) or getattr(
        model_cfg, "n_positions", None
    )
    if max_pos is not None and lm.max_prompt_tokens + new_tokens > max_pos:
        raise ConfigError(
            new_key,
            f"lm.max_prompt_tokens ({lm.max_prompt_tokens}) + {new_key} ({new_tokens}) "
            f"exceeds the model's {max_pos} positions",
        )
    check_lora(lm.lora, model_cfg, cfg.init_from, resolve_model_path(lm.model))
    info: dict[str, Any] = {
        "env": None,
        "model": lm.model,
        "parameters": parameter_count(model_cfg),
    }
    if pad_note:
        info["tokenizer_pad"] = pad_note
    return tok, info


def parameter_count(model_cfg: Any) -> int | None:
    """About how many parameters a decoder of this config has (embeddings + 12 H^2 per
    layer), from the config alone (no weights loaded); None where the fields are missing."""
    text = model_cfg.get_text_config() if hasattr(model_cfg, "get_text_config") else model_cfg
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    vocab = getattr(text, "vocab_size", None)
    if not (hidden and layers and vocab):
        return None
    return int(vocab * hidden + 12 * layers * hidden * hidden)


#: Learning rates above these are far beyond what fine-tuning papers use for a model of
#: 50M+ parameters (full: 1e-6 to 1e-5, e.g. DeepSeekMath's 1e-6, InstructGPT's 9.65e-6;
#: LoRA: about 1e-4, Hu et al. 2021): a step or two can wreck a pretrained model.
LR_WARN_FULL, LR_WARN_LORA, LR_WARN_MIN_PARAMS = 1e-4, 1e-3, 50_000_000


def warn_unusual_lr(cfg: RunConfig, parameters: int | None) -> None:
    """Warn before Ray starts when the section's learning rate is far above the usual."""
    optim = getattr(cfg.algo_config, "optim", None)
    if optim is None or parameters is None or parameters < LR_WARN_MIN_PARAMS:
        return
    bound = LR_WARN_LORA if cfg.lm.lora.enabled else LR_WARN_FULL
    if optim.lr > bound:
        usual = "about 1e-4 with LoRA" if cfg.lm.lora.enabled else "1e-6 to 1e-5"
        logger.warning(
            "%s.optim.lr=%g is far above what fine-tuning uses for a model of %.0fM parameters "
            "(%s); the first updates may destroy what the model knows",
            cfg.algo,
            optim.lr,
            parameters / 1e6,
            usual,
        )


def check_reward_fns(cfg: RunConfig) -> None:
    """``lm.reward_fn`` and ``lm.eval_fn`` import, and ``lm.reward_model`` (which replaces the
    first) is a one-label sequence-classification model with a pad token.

    Raises:
        ConfigError: Naming the key whose function or model cannot be used.
    """
    check_reward_specs(cfg)
    members = cfg.lm.reward_models
    for i, path in enumerate(members):  # every member of an ensemble, named by its index
        check_reward_model(path, "lm.reward_model" + (f"[{i}]" if len(members) > 1 else ""))


def check_reward_specs(cfg: RunConfig) -> None:
    """``lm.reward_fn`` and ``lm.eval_fn`` name functions that import (no model is loaded).

    Raises:
        ConfigError: Naming the key whose spec is malformed, whose module does not import
            or whose function does not exist (with the closest names the module has).
    """
    for key, spec in (("lm.reward_fn", cfg.lm.reward_fn), ("lm.eval_fn", cfg.lm.eval_fn)):
        try:
            load_reward_fn(spec)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None


def check_reward_call(cfg: RunConfig, prompt: Prompt) -> None:
    """Call ``lm.reward_fn`` on one real prompt (its answer as the completion) before Ray
    starts: an error, a hang, or a result that is not one finite number fails here, naming
    the function, instead of in every actor later.

    Raises:
        ConfigError: Naming ``lm.reward_fn`` and what went wrong.
    """
    if cfg.lm.reward_model is not None:  # the learned reward replaces the function
        return
    fn, timeout = load_reward_fn(cfg.lm.reward_fn), min(60.0, cfg.resources.sample_timeout_s)
    completion = str(prompt.metadata.get("answer", ""))
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            compute_rewards(fn, [prompt.text], [completion], [prompt.metadata])
        except Exception as exc:  # reported below, with the function's name
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    where = f"the first prompt of {cfg.lm.prompts}"
    if thread.is_alive():
        raise ConfigError(
            "lm.reward_fn", f"{cfg.lm.reward_fn} did not return within {timeout:g} s on {where}"
        )
    if "error" in outcome:
        raise ConfigError("lm.reward_fn", f"fails on {where}: {outcome['error']}")


def check_reward_model(path: str, key: str = "lm.reward_model") -> None:
    """``path`` holds a reward model the scorer actors can serve.

    Raises:
        ConfigError: Naming ``key`` (``lm.reward_model``, or ``lm.reward_model[i]`` for an
            ensemble's member): missing, not loadable, or not one label.
    """
    from transformers import AutoConfig

    from rlft_ray.rollout.scoring import reward_model_dir

    directory = reward_model_dir(path)
    if not (directory / "config.json").is_file():
        raise ConfigError(
            key,
            f"{path} holds no reward model (an `algo: reward_model` checkpoint or a "
            "save_pretrained sequence-classification directory)",
        )
    config = AutoConfig.from_pretrained(directory)
    if getattr(config, "num_labels", None) != 1 or config.pad_token_id is None:
        raise ConfigError(
            key,
            f"{directory} must be a one-label sequence-classification model with a pad token "
            f"(num_labels={getattr(config, 'num_labels', None)}, pad_token_id={config.pad_token_id})",
        )


def heldout_tables(cfg: RunConfig, tok: Any) -> dict[str, Any]:
    """The held-out prompt table every rank gets when ``eval_every`` is set.

    Raises:
        ConfigError: ``eval_every`` without ``lm.eval_prompts``, or a missing file.
    """
    lm = cfg.lm
    if lm.eval_prompts and not Path(lm.eval_prompts).expanduser().is_file():
        raise ConfigError("lm.eval_prompts", f"prompt file not found: {lm.eval_prompts}")
    if cfg.eval_every is None:
        return {}
    if not lm.eval_prompts:
        raise ConfigError("eval_every", "held-out evaluation needs lm.eval_prompts")
    return {HELDOUT: load_prompts(lm.eval_prompts, tok, lm, key="lm.eval_prompts")[0]}


def lm_spaces(cfg: RunConfig, tok: Any) -> Spaces:
    """What LM checkpoints record as spaces: prompts as text, tokens as actions."""
    return Spaces(
        observation=gym.spaces.Text(max_length=cfg.lm.max_prompt_tokens),
        action=gym.spaces.Discrete(len(tok)),
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
        pairs=fix(cfg.lm.pairs),
        eval_pairs=fix(cfg.lm.eval_pairs),
        reward_model=(
            fix(cfg.lm.reward_model)
            if not isinstance(cfg.lm.reward_model, tuple)
            else tuple(fix(p) for p in cfg.lm.reward_model)
        ),
    )
    return dataclasses.replace(cfg, lm=lm)


def lm_sampler_kwargs(cfg: RunConfig, index: int) -> dict[str, Any]:
    """Constructor kwargs of generation actor ``index``."""
    from rlft_ray.learners.agent_probe import agent_mode

    gpus = getattr(cfg.resources, "gpus_per_rollout_actor", 0.0)
    return {
        **({"env": cfg.env} if agent_mode(cfg) else {}),
        "lm": cfg.lm,
        "seed": cfg.seed + 10_007 * (index + 1),
        "num_threads": cfg.resources.threads_per_rollout_actor
        or torch_threads(cfg.resources.cpus_per_rollout_actor),
        "device": "cuda" if gpus > 0 else "cpu",
    }


def evaluate_lm(checkpoint: Path, cfg: RunConfig, opts: EvalOptions) -> dict[str, Any]:
    """Exact-match (``lm.eval_fn``) accuracy of greedy completions of a checkpoint's policy."""
    from rlft_ray.agents import is_text_env
    from rlft_ray.learners.agent_probe import agent_mode, evaluate_agent_checkpoint
    from rlft_ray.rollout.evaluate import evaluate_model

    if agent_mode(cfg) and not opts.dataset and not cfg.lm.eval_prompts and is_text_env(cfg.env.id):
        return evaluate_agent_checkpoint(checkpoint, cfg, opts)
    dataset = opts.dataset or cfg.lm.eval_prompts
    if not dataset:
        raise ConfigError("--dataset", "name a prompt file (the run config has no lm.eval_prompts)")
    check_reward_specs(cfg)  # before the model loads and generates
    policy_dir = checkpoint / "policy" if (checkpoint / "policy").is_dir() else checkpoint
    result = evaluate_model(
        policy_dir, dataset, cfg.lm, limit=opts.limit, seed=opts.seed, samples=opts.samples
    )
    return {"checkpoint": str(checkpoint), **result}


def heldout_lm_metrics(results: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """``eval/accuracy`` from the actors' held-out scores; with a reward model also
    ``eval/reward_model_mean`` and ``eval/reward_model_auc``, the chance that a correct
    completion outscores a wrong one: while it stays high the learned reward still tracks
    correctness, when it falls towards 0.5 the policy is gaming the reward model."""
    acc = np.concatenate([np.asarray(r["accuracy"], dtype=np.float64) for r in results])
    out = {"eval/accuracy": float(acc.mean()) if len(acc) else 0.0}
    if results and "sample_correct" in results[0]:  # lm.eval_samples: pass@k, maj@k
        correct = np.concatenate([np.asarray(r["sample_correct"], dtype=bool) for r in results])
        answers = [row for r in results for row in np.asarray(r["sample_answers"]).tolist()]
        out.update(sample_metrics(answers, correct, prefix="eval/"))
    if results and "reward_model" in results[0]:
        rm = np.concatenate([np.asarray(r["reward_model"], dtype=np.float64) for r in results])
        out["eval/reward_model_mean"] = float(rm.mean()) if len(rm) else 0.0
        right, wrong = rm[acc >= 0.5], rm[acc < 0.5]
        if len(right) and len(wrong):
            ranks = (right[:, None] > wrong[None, :]) + 0.5 * (right[:, None] == wrong[None, :])
            out["eval/reward_model_auc"] = float(ranks.mean())
    return out


class LMLearnerHooks:
    """The :class:`~rlft_ray.learners.base.Learner` hooks every LM learner shares.

    Mixed in ahead of ``Learner`` (``class GRPOLearner(LMLearnerHooks, Learner)``), so
    inheritance stays one level deep: generation actors feed the learner, checkpoints
    rank by ``reward/mean``, and the per-rank hooks forward to ``self.core``
    (an :class:`LMRank`). Each learner adds its ``__init__`` and ``update``.
    """

    scores_samples: ClassVar[bool] = True
    score_metric: ClassVar[str] = "reward/mean"
    eval_metric: ClassVar[str] = "eval/accuracy"
    curve: ClassVar[CurvePlot] = CurvePlot("reward/mean", "counters/iteration", "reward_curve.png")
    core: LMRank

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
        # with async_rollouts the last prompts taken belong to the batch in flight, which
        # no checkpoint has trained on: a checkpoint keeps the stream from before them
        self._stream_before = self.core.prompts.state()
        return self.core.next_sample_args(num_actors)

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self.core.policy_state()

    def modules(self) -> dict[str, nn.Module]:
        return self.core.modules()

    def save_extras(self, path: Path) -> None:
        self.core.save_extras(path)

    def after_init_from(self) -> None:
        self.core.reset_reference()

    def rank_state(self) -> dict[str, np.ndarray]:
        in_flight = self.cfg.async_rollouts and getattr(self, "_stream_before", None) is not None
        if in_flight:
            return self._stream_before
        return self.core.prompts.state()  # --resume goes on where the prompt stream was

    def load_rank_state(self, state: dict[str, np.ndarray]) -> None:
        if "stream_epoch" in state:
            self.core.prompts.load_state(state)

    def load_start_point(self, path: Path) -> None:
        self.core.load_start_point(path)

    def heldout_requests(self, num_actors: int) -> list[tuple[Any, ...]] | None:
        prompts = self.core.heldout
        if not prompts:
            return None
        size = -(-len(prompts) // num_actors)  # ceil: every prompt is scored once
        return [(prompts[i * size : (i + 1) * size],) for i in range(num_actors)]

    def heldout_metrics(self, results: list[Any]) -> dict[str, float]:
        return heldout_lm_metrics(results)
