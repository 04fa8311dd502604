"""Tiny, fully offline language models for tests and smoke runs.

Everything here is built locally (no model hub): a character-level tokenizer over a fixed
vocabulary that is enough for arithmetic / short text tasks, and randomly initialised GPT-2,
Llama or Qwen2 causal LMs sized to that tokenizer. :mod:`rlft_ray.lm.loading` loads these
and any other Hugging Face checkpoint (local path or hub id).

Notes for transformers 5.x:
    * ``save_pretrained`` always writes safetensors; the old ``safe_serialization`` argument is
      gone (it would be silently swallowed by ``**kwargs``), so it is not passed.
    * ``from_pretrained`` takes ``dtype=`` (``torch_dtype=`` is deprecated).
    * ``PreTrainedTokenizerFast`` is an alias of ``TokenizersBackend``.
    * ``apply_chat_template(..., tokenize=True)`` returns a ``BatchEncoding`` by default
      (``return_dict=True``); pass ``tokenize=False`` for the rendered string.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlft_ray.core.fileio import replace_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

PUNCTUATION = "+-*/=()?.,:;!'\"<>_#"
CHARACTERS: str = (
    string.digits + string.ascii_lowercase + string.ascii_uppercase + " " + PUNCTUATION + "\n"
)

# Renders each message as "role: content\n"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

SUPPORTED_ARCHS: tuple[str, ...] = ("gpt2", "llama", "qwen2")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer used by the tiny models.

    The vocabulary is the four special tokens (``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``, ids
    0-3) followed by one token per character of :data:`CHARACTERS`. Every character is its own
    token and the decoder fuses tokens back without separators, so ``decode(encode(s)) == s``
    for any string made of known characters (unknown ones become ``<unk>``). No BOS/EOS is added
    automatically; callers append ``eos_token`` where they need it.

    Returns:
        A fast tokenizer with pad/bos/eos/unk set and a simple ``"role: content\\n"`` chat template.
    """
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Split into single characters ([\s\S] so that newline is matched too).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Without a decoder, tokenizers joins tokens with spaces ("1 2 + 7"); Fuse concatenates.
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        # Clean-up would rewrite " ." -> "." etc. and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_model(
    arch: str,
    vocab_size: int,
    token_ids: dict[str, int],
    n_layer: int,
    hidden: int,
    n_head: int,
    max_positions: int,
) -> PreTrainedModel:
    """Instantiate a randomly initialised causal LM of the given architecture."""
    # Imported here: modules that only need the tokenizer stay free of model code.
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if arch == "gpt2":
        # GPT-2 ties input and output embeddings by default.
        config = GPT2Config(
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_embd=hidden,
            n_head=n_head,
            n_positions=max_positions,
            **token_ids,
        )
        return GPT2LMHeadModel(config)
    # Use grouped-query attention when possible so the KV-head code path gets exercised.
    n_kv_heads = n_head // 2 if n_head % 2 == 0 else n_head
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "num_hidden_layers": n_layer,
        "hidden_size": hidden,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_heads,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": max_positions,
        # Small Llama/Qwen2 checkpoints tie embeddings; it also halves the parameter count here.
        "tie_word_embeddings": True,
        **token_ids,
    }
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def _check_sizes(arch: str, n_layer: int, hidden: int, n_head: int, max_positions: int) -> str:
    """The lower-cased ``arch`` if the sizes fit together; else ``ValueError`` naming the size."""
    arch_key = arch.lower()
    if arch_key not in SUPPORTED_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {{{', '.join(SUPPORTED_ARCHS)}}}")
    for name, value in (("n_layer", n_layer), ("hidden", hidden), ("n_head", n_head)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    if hidden % n_head != 0:
        raise ValueError(f"hidden ({hidden}) must be divisible by n_head ({n_head})")
    if arch_key != "gpt2" and (hidden // n_head) % 2 != 0:
        raise ValueError(
            f"head dim hidden/n_head = {hidden // n_head} must be even for RoPE ({arch_key})"
        )
    return arch_key


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    arch: str = "gpt2",
    n_layer: int = 2,
    hidden: int = 64,
    n_head: int = 4,
    max_positions: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build a tiny randomly initialised causal LM plus tokenizer and save them to ``out_dir``.

    The model and tokenizer are written to a sibling temporary directory first and then renamed
    into place, so ``out_dir`` never holds a half-written checkpoint. The caller's torch RNG
    state is left untouched (initialisation runs under a forked RNG seeded with ``seed``).

    Args:
        out_dir: Destination directory (created; its parent is created if needed).
        arch: One of ``"gpt2"``, ``"llama"``, ``"qwen2"``.
        n_layer: Number of transformer blocks.
        hidden: Hidden size; must be divisible by ``n_head``.
        n_head: Number of attention heads (Llama/Qwen2 use ``n_head // 2`` KV heads when even).
        max_positions: Maximum sequence length (also the tokenizer's ``model_max_length``).
        seed: Seed for weight initialisation; the same seed gives identical weights.
        overwrite: Replace an existing non-empty ``out_dir`` instead of refusing.

    Returns:
        The resolved path of the saved checkpoint directory.

    Raises:
        ValueError: Unknown ``arch`` or inconsistent sizes.
        FileExistsError: ``out_dir`` exists and is non-empty (or is a file) and ``overwrite`` is False.
    """
    arch_key = _check_sizes(arch, n_layer, hidden, n_head, max_positions)

    out_path = Path(out_dir).expanduser().resolve()
    if out_path.exists():
        if not out_path.is_dir():
            raise FileExistsError(f"output path exists and is not a directory: {out_path}")
        if any(out_path.iterdir()) and not overwrite:
            raise FileExistsError(
                f"output directory is not empty: {out_path} (pass overwrite=True to replace it)"
            )

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = max_positions
    token_ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(
            arch_key, len(tokenizer), token_ids, n_layer, hidden, n_head, max_positions
        )
    for key, value in token_ids.items():
        setattr(model.generation_config, key, value)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        model.save_pretrained(tmp_dir)  # transformers 5.x: always safetensors
        tokenizer.save_pretrained(tmp_dir)
        replace_dir(tmp_dir, out_path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_path
