"""Loading any causal LM and its tokenizer, by local path or hub id, in one place.

:func:`resolve_model_path` fails fast (naming the config key) on a missing local path
or a hub id with no reachable hub, instead of letting ``from_pretrained`` retry for a
minute, and turns a ``.gguf`` file into its cached converted directory
(:func:`rlft_ray.lm.gguf.resolve_gguf`); :func:`load_tokenizer` and
:func:`load_model_and_tokenizer` give every tokenizer a pad token the same way
(:func:`ensure_pad_token`).
"""

from __future__ import annotations

import os
import re
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.lm.gguf import is_gguf_path, resolve_gguf
from rlft_ray.lm.lora import is_adapter_dir, load_merged, unwrap_peft
from rlft_ray.lm.tiny import PAD_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def looks_local(path_or_id: str) -> bool:
    """Heuristic: is ``path_or_id`` meant as a filesystem path rather than a hub id ``org/name``?"""
    if path_or_id.startswith(("/", "./", "../", "~", ".\\", "..\\")) or path_or_id in (".", ".."):
        return True
    if "\\" in path_or_id or path_or_id.count("/") > 1:
        return True
    # "runs/model" is local if its first component exists here; otherwise treat it as a hub id.
    head = path_or_id.split("/", 1)[0]
    return "/" in path_or_id and os.path.isdir(head)


def hub_available(repo_id: str) -> bool:
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


def resolve_model_path(
    name: str | None,
    key: str = "lm.model",
    required_by: str = "",
    dtype: str | torch.dtype | None = None,
) -> str:
    """A local model/tokenizer directory (``~`` expanded) or a reachable hub id; a ``.gguf``
    file becomes its converted directory, dequantized to ``dtype`` (``None``: float32).

    Raises:
        ConfigError: Unset, a missing local path, a hub id with no hub to fetch it from,
            or a ``.gguf`` file that cannot be converted; the message names ``key``.
    """
    if not name:
        raise ConfigError(
            key,
            f"{required_by or 'this run'} needs a causal LM: a local directory or hub id "
            "(build a tiny one with `rlft-ray make-tiny-model out/tiny-gpt2`)",
        )
    expanded = os.path.expanduser(name)
    if is_gguf_path(name):
        return resolve_gguf(expanded, dtype, key)
    if os.path.exists(expanded):
        return expanded
    hint = (
        " (`rlft-ray quickstart --output-dir runs/q` writes an SFT'd tiny model to runs/q/sft_base; "
        f"`rlft-ray make-tiny-model {name}` builds a random one there)"
    )
    if looks_local(name) or not _HUB_ID.fullmatch(name):
        raise ConfigError(key, f"model path does not exist: {name}{hint}")
    if not hub_available(name):
        raise ConfigError(
            key,
            f"{name!r} is not a local directory and the Hugging Face hub cannot be reached to fetch it{hint}",
        )
    return name


def ensure_pad_token(tokenizer: Any) -> str | None:
    """Give ``tokenizer`` a pad token if it has none; returns a note saying which, else None.

    ``pad = eos`` when there is an EOS token, else an added ``<pad>`` (the model's
    embeddings must then grow: :func:`load_model_and_tokenizer` does that).
    """
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return f"tokenizer has no pad token; using eos {tokenizer.eos_token!r} for padding"
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return f"tokenizer has no pad or eos token; added {PAD_TOKEN!r} (embeddings resized)"


def load_tokenizer(cfg: RunConfig) -> tuple[Any, str | None]:
    """The run's tokenizer (``lm.tokenizer`` or ``lm.model``) with a pad token, and a note
    when the pad token had to be chosen.

    Raises:
        ConfigError: ``lm.model`` / ``lm.tokenizer`` missing or not loadable.
    """
    model = resolve_model_path(cfg.lm.model, required_by=f"algo={cfg.algo}", dtype=cfg.lm.dtype)
    name = (
        resolve_model_path(cfg.lm.tokenizer, "lm.tokenizer", dtype=cfg.lm.dtype)
        if cfg.lm.tokenizer
        else model
    )
    try:
        from transformers import AutoTokenizer  # here: the driver's checks need no models

        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.lm.trust_remote_code)
    except Exception as exc:  # OSError, ValueError, ...: one line naming the key
        key = "lm.tokenizer" if cfg.lm.tokenizer else "lm.model"
        raise ConfigError(
            key, f"cannot load a tokenizer from {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return tok, ensure_pad_token(tok)


def _resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    """Map a dtype name ("bfloat16", "float32", "auto") to what ``from_pretrained`` accepts."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(
            f"unknown dtype {dtype!r}; use a torch.dtype, a name like 'bfloat16', or 'auto'"
        )
    return resolved


def neutral_generation_config(loaded: Any, **sampling: Any) -> Any:
    """A ``GenerationConfig`` with the checkpoint's special-token ids, ``sampling`` (e.g.
    ``temperature``) and nothing else: every processor a checkpoint's own
    ``generation_config.json`` ships (``repetition_penalty``, ``min_p``, ...) stays off."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=loaded.bos_token_id,
        eos_token_id=loaded.eos_token_id,
        pad_token_id=loaded.pad_token_id,
        **sampling,
    )


#: Activations transformers writes out as several elementwise ops, and the single
#: fused kernel that computes the same function (the tanh approximation of GELU).
_FUSED_ACTIVATIONS = ("NewGELUActivation", "FastGELUActivation")


def fuse_activations(model: torch.nn.Module) -> int:
    """Swap GPT-2-style ``gelu_new`` / ``gelu_fast`` activation modules for
    ``nn.GELU(approximate="tanh")``: the same function, one kernel each way instead of
    about eight elementwise ops (a fifth of a small GPT-2's training step on a CPU).
    Weights and the saved config are untouched. Returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in _FUSED_ACTIVATIONS:
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def load_model_and_tokenizer(
    path_or_id: str | os.PathLike[str],
    trust_remote_code: bool = False,
    dtype: str | torch.dtype | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, making sure the tokenizer has a pad token.

    See :func:`ensure_pad_token`; when it adds a token the model's embeddings are
    resized. The model config and generation config get the pad id when they lack one.
    The tokenizer's ``padding_side`` is left as loaded: generation wants left padding,
    loss computation right padding, so callers choose per use. Unfused activations are
    swapped for fused ones computing the same function (:func:`fuse_activations`).

    Args:
        path_or_id: Local checkpoint directory or a Hugging Face hub id; a LoRA
            checkpoint's adapter directory loads its base model with the adapters merged;
            a ``.gguf`` file loads its directory converted to ``dtype``
            (:func:`resolve_model_path`).
        trust_remote_code: Forwarded to ``from_pretrained`` (custom modelling code).
        dtype: Model dtype (``torch.dtype``, a name such as ``"bfloat16"``, or ``"auto"``);
            ``None`` keeps the transformers default.
        tokenizer_path: Load the tokenizer from here instead of ``path_or_id`` (a ``.gguf``
            file too).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: ``path_or_id`` looks like a local path but does not exist.
        ValueError: ``dtype`` is not a recognised dtype.
        ConfigError: A ``.gguf`` file that cannot be converted.
    """
    name = os.fspath(path_or_id)
    if is_gguf_path(name):
        name = resolve_model_path(name, dtype=dtype)
    if tokenizer_path is not None and is_gguf_path(tokenizer_path):
        tokenizer_path = resolve_model_path(os.fspath(tokenizer_path), "lm.tokenizer", dtype=dtype)
    if (isinstance(path_or_id, os.PathLike) or looks_local(name)) and not os.path.exists(
        os.path.expanduser(name)
    ):
        raise FileNotFoundError(f"model path does not exist: {name}")
    if os.path.exists(os.path.expanduser(name)):
        name = os.path.expanduser(name)

    model_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    resolved_dtype = _resolve_dtype(dtype)
    if resolved_dtype is not None:
        model_kwargs["dtype"] = resolved_dtype  # transformers 5.x: `torch_dtype` is deprecated

    tok_name = os.path.expanduser(os.fspath(tokenizer_path)) if tokenizer_path else name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_name, trust_remote_code=trust_remote_code)
    if is_adapter_dir(name):  # a LoRA checkpoint's policy/: its base with the adapters merged
        model = load_merged(name, model_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, **model_kwargs)
    fuse_activations(model)

    pad_changed = ensure_pad_token(tokenizer) is not None
    if pad_changed and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    # Keep model-side pad ids consistent with the tokenizer (generate() reads generation_config):
    # overwrite them when we just chose the pad token, otherwise only fill in missing ones.
    if pad_changed or getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and (pad_changed or generation_config.pad_token_id is None):
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (``lm.gradient_checkpointing``).

    Transformers checkpoints a layer only while that layer is in training mode; the
    learners keep their models in eval mode (dropout off: their log-probs must match the
    sampler's), so only the checkpointed layers themselves are flagged as training, and
    the modules inside them (attention dropout included) stay in eval mode.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    hf = unwrap_peft(model)
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.25
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in hf.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(
            f"lm.gradient_checkpointing: {type(hf).__name__} has no checkpointable layers"
        )
    for layer in layers:
        layer.training = True  # this module only, not its children
