"""Generation actors: sample completions from a causal LM, then score them.

:class:`GenerationActor` is a plain class (tests drive it without Ray); the driver
wraps it with ``ray.remote`` like the env runners. Its three steps stay separate so
later samplers can recombine them (e.g. rejection sampling: generate many, score,
select a few):

* :meth:`GenerationActor.generate` — batched sampling with the KV cache
  (``model.generate``), returning token ids, masks and per-token log-probs under
  the sampling policy, tagged with the policy version;
* :meth:`GenerationActor.score` — the reward function on the decoded completions;
* :meth:`GenerationActor.select` — which completions go to the learner: all of them, or
  (with a ``selection`` section) those a rejection-sampling rule accepts, so only
  accepted samples cross to the learner.

:meth:`GenerationActor.sample` chains the three; it is what the training loop calls.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import LogitsProcessorList

from rlft_ray.config import EnvConfig, LMConfig, RSFTConfig
from rlft_ray.core.torch_utils import hold_threads, peak_rss_mb, tied_aliases
from rlft_ray.lm.loading import load_model_and_tokenizer, neutral_generation_config
from rlft_ray.lm.lora import adapter_tensors, apply_lora
from rlft_ray.lm.policy import PolicyWithValueHead, response_forward
from rlft_ray.rewards import compute_rewards_within, load_reward_fn
from rlft_ray.rollout.actor_weights import WeightLoading
from rlft_ray.rollout.heldout import HeldOutScoring
from rlft_ray.rollout.multiturn import play
from rlft_ray.rollout.prefill import prefilled_generate
from rlft_ray.rollout.sampled_logprobs import SampledLogprobs
from rlft_ray.rollout.scoring import ScorerClient
from rlft_ray.rollout.selection import Selector
from rlft_ray.rollout.turn_cache import TurnCaching
from rlft_ray.rollout.value_guided import ValueGuidedDecoding
from rlft_ray.rollout.vllm_setup import special_ids
from rlft_ray.types import UNSYNCED_VERSION, GenerationBatch, Prompt, SelectionStats, pad_sequences

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from rlft_ray.rollout.vllm_engine import VLLMEngine


class GenerationActor(WeightLoading, ValueGuidedDecoding, HeldOutScoring, TurnCaching):
    """Holds one copy of the policy LM and samples completions for prompts.

    Args:
        lm: The ``lm`` config section (model, sampling parameters, reward function).
        seed: Seeds torch's sampling RNG in this actor.
        num_threads: torch threads (the CPUs this actor holds).
        device: ``"cpu"`` or ``"cuda"``.
        model_path: Load weights from here instead of ``lm.model`` (e.g. a checkpoint's
            ``policy/`` directory); the learner publishes its weights before the
            first sample anyway, so this only matters for evaluation.
        selection: The ``rsft`` section: select samples by its rule (rejection sampling);
            None keeps every sample.
        scorers: Reward-model scorers (Ray actor handles or plain
            :class:`~rlft_ray.rollout.scoring.RewardModelScorer` s) that score completions
            instead of ``lm.reward_fn`` (``lm.reward_model``).
        env: A text environment (``env`` section): :meth:`sample` then plays multi-turn
            episodes from the prompts' reset seeds (:func:`~rlft_ray.rollout.multiturn.play`),
            scored by the environment's rewards instead of ``lm.reward_fn``.
    """

    def __init__(
        self,
        lm: LMConfig,
        seed: int = 0,
        num_threads: int = 1,
        device: str = "cpu",
        model_path: str | None = None,
        selection: RSFTConfig | None = None,
        scorers: Sequence[Any] | None = None,
        env: EnvConfig | None = None,
    ) -> None:
        from rlft_ray.lm import quiet_transformers

        quiet_transformers()
        hold_threads(num_threads)
        torch.manual_seed(seed)
        self.lm = lm
        self.device = torch.device(device)
        path = model_path or lm.model
        if path is None:
            raise ValueError("lm.model is not set")
        tokenizer_path = None if model_path else lm.tokenizer
        self.engine: VLLMEngine | None = None
        self.lora = self.merge_lora = self.merged = False
        if lm.backend == "vllm":
            self._init_vllm(path, tokenizer_path, seed, num_threads, device, model_path is None)
        else:
            self._init_hf(path, tokenizer_path, model_path is None)
        self._init_value_guidance(path)  # lm.decode=ilql: the ILQL heads beside the model
        self.text_env = env
        self.idle_text_envs: list[Any] = []  # envs of ended episodes, reset for the next
        self.reward_fn = load_reward_fn(lm.reward_fn)
        self.reward_model = ScorerClient(scorers, start=seed) if scorers else None
        self.policy_version = UNSYNCED_VERSION  # until the learner publishes
        self.selector = Selector(selection, seed) if selection is not None else None
        self.target: PolicyWithValueHead | None = None
        if self.selector is not None and self.selector.needs_target:
            target, _ = load_model_and_tokenizer(
                selection.target_model, trust_remote_code=lm.trust_remote_code, dtype=lm.dtype
            )
            self.target = PolicyWithValueHead(target.to(self.device).eval())

    def _init_hf(self, path: str, tokenizer_path: str | None, from_run: bool) -> None:
        """The transformers sampler: the model ``generate`` runs on, and its tensors
        ``set_weights`` copies into (the adapters alone with LoRA)."""
        self.model, self.tokenizer = load_model_and_tokenizer(
            path,
            trust_remote_code=self.lm.trust_remote_code,
            dtype=self.lm.dtype,
            tokenizer_path=tokenizer_path,
        )
        self.model.to(self.device).eval()
        # Sample from the run config alone: transformers fills every generation field left
        # unset from the checkpoint's own generation_config.json (repetition_penalty, min_p,
        # no_repeat_ngram_size, ...), which would sample from another distribution than the
        # temperature-scaled one whose log-probs are recorded (and the learner recomputes).
        self.model.generation_config = neutral_generation_config(self.model.generation_config)
        self.lora = self.lm.lora.enabled and from_run
        # fp32 weights take the adapters merged in (sampling at the plain model's speed):
        # merge / unmerge round-trips leave ~1e-7 relative error there, but in bf16 / fp16
        # the rounding piles up sync after sync, so those keep the adapters unmerged (exact)
        self.merge_lora = self.lora and next(self.model.parameters()).dtype == torch.float32
        self.merged = False
        self._alias_of: dict[str, str] = {}  # a tied tensor's second name -> its first
        if self.lora:  # the learner publishes only adapters
            self.model = apply_lora(self.model, self.lm.lora).eval()
            self._tensors = adapter_tensors(self.model)
        else:
            # tied weights once: loading the embedding updates the head that shares it
            full = self.model.state_dict(keep_vars=True)
            self._alias_of = tied_aliases(full)
            self._tensors = {k: v for k, v in full.items() if k not in self._alias_of}
        self._tensor_names = set(self._tensors)
        self._aliased: set[str] = set()  # tensors whose storage is a shared file's slot
        self.eos_ids, self.pad_id = special_ids(
            self.tokenizer, self.model.generation_config.eos_token_id
        )
        self.max_positions = getattr(
            self.model.config.get_text_config(), "max_position_embeddings", None
        )

    def _init_vllm(
        self,
        path: str,
        tokenizer_path: str | None,
        seed: int,
        num_threads: int,
        device: str,
        from_run: bool,
    ) -> None:
        """The vLLM sampler (``lm.backend: vllm``, :func:`~rlft_ray.rollout.vllm_setup.vllm_sampler`):
        an in-process engine, no transformers copy of the weights."""
        from rlft_ray.rollout.vllm_setup import vllm_sampler

        sampler = vllm_sampler(self.lm, path, tokenizer_path, seed, num_threads, device, from_run)
        self.model = None
        self.tokenizer, self.engine, self.lora = sampler.tokenizer, sampler.engine, sampler.lora
        self._tensor_names, self._alias_of = sampler.tensor_names, sampler.alias_of
        self.eos_ids, self.pad_id = sampler.eos_ids, sampler.pad_id
        self.max_positions = sampler.max_positions

    def close(self) -> None:
        """Shut the vLLM engine down (frees its KV cache; nothing to do for ``hf``)."""
        if self.engine is not None:
            self.engine.close()

    # -- generate / score / select -------------------------------------------------------
    def _generation_config(self, greedy: bool, max_new_tokens: int) -> GenerationConfig:
        """One sequence per input row: callers repeat a prompt's rows for its samples
        (:func:`~rlft_ray.rollout.prefill.generate_repeated`)."""
        from transformers import GenerationConfig

        kwargs = (
            {"do_sample": False}
            if greedy or self._draws_itself()  # the recorder draws; generate's argmax takes it
            else {
                "do_sample": True,
                "temperature": self.lm.temperature,
                "top_p": self.lm.top_p,
                "top_k": 0,
            }
        )
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids or None,
            bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True,
            **kwargs,
        )

    def _draws_itself(self) -> bool:
        """Whether sampled calls draw their tokens in the log-prob recorder
        (:func:`~rlft_ray.rollout.sampled_logprobs.draw`: the same distribution at a tenth
        of ``torch.multinomial``'s cost) rather than in ``generate``; with top-p,
        ``generate``'s nucleus warper samples."""
        return self.lm.top_p == 1.0

    def _recorder(self, greedy: bool) -> SampledLogprobs | None:
        """The sampled tokens' log-prob recorder of a ``generate`` call (None: greedy)."""
        return None if greedy else SampledLogprobs(self.lm.temperature, self._draws_itself())

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        num_samples: int | None = None,
        greedy: bool = False,
        max_new_tokens: int | None = None,
    ) -> GenerationBatch:
        """Sample ``num_samples`` completions per prompt (greedy: one, argmax decoding).

        Prompts are left-padded and generated in chunks of at most
        ``lm.generation_batch_size`` sequences; generation stops at EOS or after
        ``max_new_tokens``. Rewards are left at 0 (see :meth:`score`).

        Returns:
            A :class:`GenerationBatch`; greedy batches carry zero log-probs.
        """
        n = 1 if greedy else (num_samples or self.lm.num_samples)
        max_new = max_new_tokens or self.lm.max_new_tokens
        per_call = max(1, self.lm.generation_batch_size // n)
        start = time.perf_counter()
        if self.engine is not None:  # vLLM schedules the whole batch itself
            parts = [self._engine_batch(list(prompts), n, greedy, max_new)] if prompts else []
        else:
            config = self._generation_config(greedy, max_new)
            parts = [
                self._generate_chunk(list(prompts[i : i + per_call]), n, config, greedy)
                for i in range(0, len(prompts), per_call)
            ]
        batch = GenerationBatch.concat(parts) if parts else self._empty(n)
        batch.generate_s = time.perf_counter() - start
        return batch

    def _generate_chunk(
        self, prompts: list[Prompt], n: int, config: GenerationConfig, greedy: bool
    ) -> GenerationBatch:
        """One ``generate`` call; group ids start at 0 (``GenerationBatch.concat`` offsets them)."""
        p_len = max(len(p.ids) for p in prompts)
        if self.max_positions is not None and p_len + config.max_new_tokens > self.max_positions:
            # Never generate past the model's positions (GPT-2 would index out of range).
            if p_len >= self.max_positions:
                raise ValueError(
                    f"a prompt of {p_len} tokens leaves no room in the model's {self.max_positions} positions"
                )
            config = copy.copy(config)
            config.max_new_tokens = self.max_positions - p_len
        prompt_ids, prompt_mask = pad_sequences(
            [p.ids for p in prompts], self.pad_id, "left", p_len
        )
        recorder = self._recorder(greedy)
        if self.lm.decode == "ilql":  # value-guided decoding records its own log-probs
            response, guided = self._ilql_chunk(prompt_ids, prompt_mask, n, config, greedy)
            recorder = None if greedy else SampledLogprobs.given(guided)
        else:
            processors = None if recorder is None else LogitsProcessorList([recorder])
            # each prompt's prefill once, a prefix they share once (none for 1-token prompts)
            rows = [p.ids for p in prompts]
            response = prefilled_generate(self.model, rows, n, config, processors, self.pad_id)
        response, mask, logprobs = self._real_tokens(response, recorder)
        return self._batch(
            prompts,
            n,
            prompt_ids,
            prompt_mask,
            response.cpu().numpy(),
            mask.cpu().numpy(),
            logprobs.cpu().numpy().astype(np.float32),
        )

    def _real_tokens(
        self, response: torch.Tensor, recorder: SampledLogprobs | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(response, mask, logprobs)``: the real tokens are everything up to and
        including the first EOS; the rest becomes padding with log-prob 0."""
        is_eos = torch.isin(response, torch.as_tensor(self.eos_ids, device=response.device))
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        mask = ~after_eos
        response = response.masked_fill(~mask, self.pad_id)
        if recorder is None:
            logprobs = torch.zeros(response.shape, dtype=torch.float32)
        else:
            logprobs = recorder.finish(response).masked_fill(~mask, 0.0)
        return response, mask, logprobs

    def _engine_batch(
        self, prompts: list[Prompt], n: int, greedy: bool, max_new_tokens: int
    ) -> GenerationBatch:
        """One call of the vLLM engine over all of ``prompts``."""
        out = self.engine.generate([p.ids for p in prompts], n, greedy, max_new_tokens)
        prompt_ids, prompt_mask = pad_sequences([p.ids for p in prompts], self.pad_id, "left")
        return self._batch(
            prompts, n, prompt_ids, prompt_mask, out.response_ids, out.response_mask, out.logprobs
        )

    def _batch(
        self,
        prompts: list[Prompt],
        n: int,
        prompt_ids: np.ndarray,
        prompt_mask: np.ndarray,
        response: np.ndarray,
        mask: np.ndarray,
        logprobs: np.ndarray,
    ) -> GenerationBatch:
        """A :class:`GenerationBatch` of ``n`` completions per prompt (prompt-major rows),
        their text decoded; group ids start at 0."""
        completions = self.tokenizer.batch_decode(
            [row[m].tolist() for row, m in zip(response, mask)], skip_special_tokens=True
        )
        return GenerationBatch(
            prompt_ids=np.repeat(prompt_ids, n, axis=0),
            prompt_mask=np.repeat(prompt_mask, n, axis=0),
            response_ids=response.astype(np.int64),
            response_mask=mask,
            logprobs=logprobs,
            rewards=np.zeros(len(prompts) * n, dtype=np.float32),
            group_ids=np.repeat(np.arange(len(prompts)), n),
            prompts=[p.text for p in prompts for _ in range(n)],
            completions=list(completions),
            metadata=[p.metadata for p in prompts for _ in range(n)],
            policy_version=self.policy_version,
            group_size=n,
            pad_token_id=self.pad_id,
            prompt_templated=np.repeat([p.templated for p in prompts], n).astype(bool),
        )

    def _empty(self, n: int) -> GenerationBatch:
        zeros = np.zeros((0, 0), dtype=np.int64)
        return GenerationBatch(
            prompt_ids=zeros,
            prompt_mask=zeros.astype(bool),
            response_ids=zeros,
            response_mask=zeros.astype(bool),
            logprobs=zeros.astype(np.float32),
            rewards=np.zeros(0, dtype=np.float32),
            group_ids=np.zeros(0, dtype=np.int64),
            prompts=[],
            completions=[],
            metadata=[],
            policy_version=self.policy_version,
            group_size=n,
            pad_token_id=self.pad_id,
        )

    def score(self, batch: GenerationBatch) -> np.ndarray:
        """Rewards of ``batch``'s completions: the reward model's if one serves this actor,
        else ``lm.reward_fn``'s.

        Raises:
            RewardError: The reward function raised or returned the wrong number of
                values or a non-finite value; the message names the sample.
        """
        if self.reward_model is not None:
            return self.reward_model(batch.prompts, batch.completions, batch.prompt_templated)
        args = (batch.prompts, batch.completions, batch.metadata, self.lm.reward_timeout_s)
        rewards = compute_rewards_within(self.reward_fn, *args)
        if rewards is None:  # a hung reward function: scored 0 and counted, the run goes on
            batch.reward_timeouts += 1
            return np.zeros(len(batch), dtype=np.float32)
        return np.asarray(rewards, dtype=np.float32)

    def select(self, batch: GenerationBatch) -> GenerationBatch:
        """The completions handed to the learner (all of them without a selection rule).

        With a rule, the returned batch holds the accepted rows only and carries
        :class:`~rlft_ray.types.SelectionStats` about every generated sample.
        """
        if self.selector is None:
            return batch
        target_logp = self.target_logprobs(batch) if self.target is not None else None
        out = self.selector(
            batch.rewards, batch.group_size, batch.logprobs.sum(axis=1), target_logp
        )
        selected = batch.take(out.keep)
        selected.selection = SelectionStats(
            rewards=batch.rewards.copy(),
            lengths=batch.response_mask.sum(axis=1).astype(np.int64),
            accepted=out.keep,
            clipped=out.clipped,
            bound=out.bound,
        )
        return selected

    @torch.no_grad()
    def target_logprobs(self, batch: GenerationBatch) -> np.ndarray:
        """``[B]`` log p(c) of each completion under the target model (summed over its tokens)."""
        if self.target is None:
            raise ValueError("no target model (rsft.target_model) is loaded")
        out = []
        step = max(1, self.lm.generation_batch_size)
        for i in range(0, len(batch), step):
            rows = slice(i, i + step)
            mask = torch.as_tensor(batch.response_mask[rows], device=self.device)
            logp = response_forward(
                self.target,
                torch.as_tensor(batch.prompt_ids[rows], device=self.device),
                torch.as_tensor(batch.prompt_mask[rows], device=self.device),
                torch.as_tensor(batch.response_ids[rows], device=self.device),
                mask,
            ).logprobs
            out.append((logp * mask).sum(-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def sample(self, prompts: Sequence[Prompt]) -> GenerationBatch:
        """generate -> score -> select: one iteration's completions for these prompts (text
        environment: its multi-turn episodes, scored by their rewards)."""
        batch = play(self, prompts) if self.text_env is not None else self.generate(prompts)
        if self.text_env is None:
            batch.rewards = self.score(batch)
        batch = self.select(batch)
        batch.peak_rss_mb = (peak_rss_mb(),)
        return batch
