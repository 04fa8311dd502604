"""The class-level hooks of LM agents: an LM learner (GRPO, token PPO, RSFT) without
``lm.prompts`` trains on multi-turn episodes of the text environment ``env``.

:func:`probe_agent` checks the model, makes the environment once (an unregistered id, bad
kwargs or a non-text environment fail here, naming ``env.id``, before Ray starts), and
hands the learners a "prompt" table of reset seeds: the prompt stream, its sharding over
ranks and its ``--resume`` state are the single-turn ones, and each seed's
``lm.num_samples`` episodes are one GRPO group. Held-out episodes (``eval_every``) use
``eval_episodes`` seeds from :data:`~rlft_ray.learners.base.HELDOUT_SEED` on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import HELDOUT_SEED, EvalOptions, TaskProbe
from rlft_ray.learners.lm_rank import HELDOUT, PROMPTS


def agent_mode(cfg: RunConfig) -> bool:
    """Whether ``cfg`` trains an LM agent in ``env`` (an agent-capable algorithm, no prompts)."""
    from rlft_ray.config.algorithms import algorithm_spec

    return algorithm_spec(cfg.algo).agents_ok and not cfg.lm.prompts


def seed_table(seeds: range) -> pd.DataFrame:
    """A prompt table whose rows are reset seeds (empty prompts, ``metadata.seed``)."""
    return pd.DataFrame(
        {
            "prompt": [""] * len(seeds),
            "prompt_ids": [[] for _ in seeds],
            "metadata": [json.dumps({"seed": int(s)}) for s in seeds],
            "templated": [False] * len(seeds),
        }
    )


def probe_agent(cfg: RunConfig, training: bool = True) -> TaskProbe:
    """Everything about an LM-agent run that can be checked before Ray starts.

    Raises:
        ConfigError: Naming ``lm.chat_template`` / ``lm.reward_model`` (not for agents),
            ``lm.prompts`` (neither prompts nor a text environment),
            ``env.id`` (unregistered, cannot be made, its
            first observation does not fit ``lm.max_prompt_tokens``), ``lm.model``, or
            ``lm.prompts_per_iteration`` (not a multiple of the actors).
    """
    from rlft_ray.agents import (
        NotTextEnvError,
        TextEnvError,
        check_text_env,
        make_text_env,
    )
    from rlft_ray.learners.lm_learner import absolute_paths, check_model, lm_spaces

    lm, res, env_cfg = cfg.lm, cfg.resources, cfg.env
    if lm.chat_template:
        raise ConfigError(
            "lm.chat_template",
            "a text environment's observations are appended as they are (the env writes its "
            "own turn markers); chat templates for multi-turn episodes are not supported",
        )
    if lm.reward_model is not None:
        raise ConfigError(
            "lm.reward_model", "an LM agent is rewarded by its environment, not a reward model"
        )
    tok, info = check_model(cfg, lm.max_new_tokens, "lm.max_new_tokens")
    try:
        env = make_text_env(env_cfg.id, env_cfg.kwargs)
        obs, _ = env.reset(seed=cfg.seed)
        check_text_env(obs, f"{env_cfg.id} reset")
        env.close()
    except NotTextEnvError as exc:  # e.g. the default CartPole: no prompts, no text env
        raise ConfigError(
            "lm.prompts",
            f"algo={cfg.algo} needs a prompt file (.jsonl or .parquet with a 'prompt' column), "
            f"or env.id naming a text environment to train an LM agent in ({exc})",
        ) from None
    except TextEnvError as exc:
        raise ConfigError(
            "env.id", f"{exc} (algo={cfg.algo} without lm.prompts trains an LM agent in env)"
        ) from None
    prompt_tokens = len(tok(obs, add_special_tokens=False)["input_ids"])
    if prompt_tokens > lm.max_prompt_tokens:
        raise ConfigError(
            "lm.max_prompt_tokens",
            f"is {lm.max_prompt_tokens} but {env_cfg.id}'s first observation has {prompt_tokens} tokens",
        )
    if training and lm.prompts_per_iteration % res.num_rollout_actors:
        raise ConfigError(
            "lm.prompts_per_iteration",
            f"{lm.prompts_per_iteration} reset seeds cannot be split evenly over "
            f"resources.num_rollout_actors={res.num_rollout_actors}",
        )
    tables = {}
    if cfg.eval_every is not None:
        start = HELDOUT_SEED + cfg.seed
        tables[HELDOUT] = seed_table(range(start, start + cfg.eval_episodes))
    info = {**info, "env": env_cfg.id, "agent": True, "data/source": f"{env_cfg.id} seeds"}
    return TaskProbe(
        spaces=lm_spaces(cfg, tok),
        datasets={PROMPTS: seed_table(range(cfg.seed, cfg.seed + env_cfg.train_seeds))},
        tables=tables,
        info=info,
        cfg=absolute_paths(cfg),
    )


def evaluate_agent_checkpoint(
    checkpoint: Path, cfg: RunConfig, opts: EvalOptions
) -> dict[str, Any]:
    """``rlft-ray eval`` of an LM-agent checkpoint: greedy episodes on held-out seeds
    (``--episodes`` of them from ``HELDOUT_SEED + --seed``, never training seeds; solved
    fraction as ``accuracy``)."""
    from rlft_ray.rollout.evaluate import evaluate_agent

    policy_dir = checkpoint / "policy" if (checkpoint / "policy").is_dir() else checkpoint
    first = HELDOUT_SEED + opts.seed
    seeds = range(first, first + (opts.limit or opts.episodes))
    return {"checkpoint": str(checkpoint), **evaluate_agent(policy_dir, cfg.lm, cfg.env, seeds)}
