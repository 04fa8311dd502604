"""What a generation actor with ``lm.backend: vllm`` is made of, built from a model path.

:func:`vllm_sampler` resolves the path (a ``.gguf`` file to its converted directory; a
LoRA checkpoint's adapter directory to its base model plus those adapters), loads the
tokenizer, names the tensors ``set_weights`` must receive (from the config, on the meta
device: no transformers copy of the weights is kept) and starts the
:class:`~rlft_ray.rollout.vllm_engine.VLLMEngine`. vLLM is imported only then.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlft_ray.config import LMConfig
from rlft_ray.core.torch_utils import tied_aliases
from rlft_ray.lm.lora import (
    ADAPTER_CONFIG,
    adapter_base,
    adapter_tensors,
    apply_lora,
    is_adapter_dir,
)


def special_ids(tokenizer: Any, gen_eos: int | list[int] | None) -> tuple[list[int], int]:
    """``(eos_ids, pad_id)``: the generation config's EOS ids and the tokenizer's, sorted,
    and the tokenizer's pad id."""
    eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return sorted(eos), int(tokenizer.pad_token_id)


@dataclass
class VLLMSampler:
    """A vLLM generation actor's parts.

    Attributes:
        engine: The running :class:`~rlft_ray.rollout.vllm_engine.VLLMEngine`.
        tokenizer: The prompts' tokenizer (pad token ensured).
        lora: Whether published weights are LoRA adapters (served as vLLM LoRA).
        tensor_names: What ``set_weights`` must receive (tied second names left out).
        alias_of: A tied tensor's second name -> its first (``lm_head.weight`` ->
            ``model.embed_tokens.weight``); empty with LoRA.
        eos_ids: Ids that end a completion.
        pad_id: Id written on padding.
        max_positions: The model's ``max_position_embeddings`` (None: unbounded).
    """

    engine: Any
    tokenizer: Any
    lora: bool
    tensor_names: set[str]
    alias_of: dict[str, str]
    eos_ids: list[int]
    pad_id: int
    max_positions: int | None


def _resolve(
    lm: LMConfig, path: str, tokenizer_path: str | None
) -> tuple[str, str | None, str | None, int]:
    """``(model path, tokenizer path, adapter directory or None, its LoRA rank or 0)``:
    ``.gguf`` files become their converted directories (in ``lm.dtype``), an adapter
    directory its base model (its tokenizer stays the adapter directory's when it has one)."""
    from rlft_ray.lm.gguf import is_gguf_path
    from rlft_ray.lm.loading import resolve_model_path

    if is_gguf_path(path):
        path = resolve_model_path(path, dtype=lm.dtype)
    if tokenizer_path is not None and is_gguf_path(tokenizer_path):
        tokenizer_path = resolve_model_path(tokenizer_path, "lm.tokenizer", dtype=lm.dtype)
    if not is_adapter_dir(path):
        return path, tokenizer_path, None, 0
    adapter_dir = path
    rank = int(json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["r"])
    if tokenizer_path is None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        tokenizer_path = adapter_dir
    return adapter_base(adapter_dir), tokenizer_path, adapter_dir, rank


def vllm_sampler(
    lm: LMConfig,
    path: str,
    tokenizer_path: str | None,
    seed: int,
    num_threads: int,
    device: str,
    from_run: bool,
) -> VLLMSampler:
    """Build the vLLM side of a generation actor.

    With ``lm.lora`` (and ``from_run``: the learner will publish) the engine serves the
    published adapters through vLLM's LoRA support on the unchanged base. A LoRA
    checkpoint's ``policy/`` (an adapter directory, e.g. under ``rlft-ray eval``) loads its
    base model with those adapters served the same way.

    Args:
        lm: The ``lm`` section.
        path: Model directory, hub id, ``.gguf`` file or adapter directory.
        tokenizer_path: The tokenizer's (None: ``path``'s, or the adapter directory's).
        seed: vLLM's sampling seed.
        num_threads: CPUs the actor holds.
        device: ``"cpu"`` or ``"cuda"``.
        from_run: The weights will be published by a learner (not a checkpoint's).

    Raises:
        ImportError: vLLM is not installed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlft_ray.lm.loading import ensure_pad_token
    from rlft_ray.rollout.vllm_engine import VLLMEngine

    path, tokenizer_path, adapter_dir, lora_rank = _resolve(lm, path, tokenizer_path)
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_path or path, trust_remote_code=lm.trust_remote_code
    )
    ensure_pad_token(tokenizer)
    config = AutoConfig.from_pretrained(path, trust_remote_code=lm.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=lm.trust_remote_code)
    lora = lm.lora.enabled and from_run and adapter_dir is None
    alias_of: dict[str, str] = {}
    if lora:  # the learner publishes only adapters
        tensor_names = set(adapter_tensors(apply_lora(skeleton, lm.lora)))
        lora_rank = lm.lora.r
    else:
        full = skeleton.state_dict(keep_vars=True)
        alias_of = tied_aliases(full)
        tensor_names = set(full) - set(alias_of)
    try:
        gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        gen_eos = config.eos_token_id
    eos_ids, pad_id = special_ids(tokenizer, gen_eos)
    text_config = config.get_text_config()
    engine = VLLMEngine(
        lm,
        path,
        eos_ids,
        pad_id,
        text_config,
        tokenizer_path=tokenizer_path,
        seed=seed,
        num_threads=num_threads,
        device=device,
        lora_rank=lora_rank,
    )
    if adapter_dir is not None:
        engine.load_adapter_dir(adapter_dir)
    return VLLMSampler(
        engine=engine,
        tokenizer=tokenizer,
        lora=lora,
        tensor_names=tensor_names,
        alias_of=alias_of,
        eos_ids=eos_ids,
        pad_id=pad_id,
        max_positions=getattr(text_config, "max_position_embeddings", None),
    )
