"""LoRA adapters through ``peft``: wrapping, checking, publishing and loading them.

With ``lm.lora.r > 0`` the learner trains only the adapters of a ``peft`` model, the
generation actors wrap their copy of the base model the same way and receive only the
adapter tensors (:func:`adapter_tensors`), a checkpoint's ``policy/`` is ``peft``'s
adapter directory (``adapter_model.safetensors`` + ``adapter_config.json`` naming the
base model), and :func:`load_merged` turns such a directory back into a plain model with
the adapters merged (eval, export, DPO's reference, ``init_from`` into a full model).

The KL reference is the same module with the adapters disabled (:class:`LoRAReference`),
or with a stored copy of reference adapters swapped in after ``init_from`` or an online
DPO refresh: adapter-sized state instead of a second model.

``peft`` is an optional dependency (``pip install 'rlft-ray[lora]'``): imported here only
when LoRA is on, and :func:`check_lora` names the key when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlft_ray.config import ConfigError, LoRAConfig

#: The file in a ``peft`` adapter directory that marks it as one.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: ``peft``'s name of the one adapter we train.
ADAPTER_NAME = "default"
#: Every LoRA tensor's name holds this (``...c_attn.lora_A.default.weight``).
LORA_MARK = ".lora_"


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft`` wrapper (its adapters live inside the same
    modules), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def require_peft() -> Any:
    """The ``peft`` module, or a ConfigError naming ``lm.lora.r`` and the install command."""
    try:
        import peft
    except ImportError as exc:
        raise ConfigError(
            "lm.lora.r",
            "LoRA needs the peft package, which is not installed: "
            "pip install 'rlft-ray[lora]' (or set lm.lora.r=0 for full fine-tuning)",
        ) from exc
    return peft


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ``peft`` adapter directory (a LoRA checkpoint's ``policy/``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the model's adaptable layers (``nn.Linear`` / GPT-2's ``Conv1D``),
    without the output head: what ``lm.lora.target_modules`` may name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if is_linear and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model: nn.Module, lora: LoRAConfig) -> None:
    """Fail naming ``lm.lora.target_modules`` when a target matches no layer of ``model``.

    Raises:
        ConfigError: Listing the names the architecture has.
    """
    if tuple(lora.target_modules) == ("all-linear",):
        return
    available = linear_module_names(model)
    unknown = [t for t in lora.target_modules if t not in available]
    if unknown:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            "lm.lora.target_modules",
            f"{unknown} match no layer of this {arch} model; its linear layers are "
            f"{available} (or use all-linear)",
        )


def check_lora(
    lora: LoRAConfig,
    model_config: Any,
    init_from: str | None = None,
    base_path: str | None = None,
) -> None:
    """Before Ray starts: peft is installed, the target modules exist in the architecture
    (checked on an empty, weightless copy of the model), ``lm.model`` (``base_path``) is a
    full model, and an ``init_from`` checkpoint holds adapters trained on that same base.

    Raises:
        ConfigError: Naming ``lm.lora.r`` (no peft), ``lm.lora.target_modules``,
            ``lm.model`` or ``init_from``.
    """
    if not lora.enabled:
        return
    require_peft()
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    check_targets(skeleton, lora)
    if base_path is not None and is_adapter_dir(base_path):
        raise ConfigError(
            "lm.model",
            f"{base_path} holds LoRA adapters; new adapters need a full base model: "
            "`rlft-ray export` that checkpoint and make the exported directory lm.model",
        )
    if not init_from:
        return
    policy = Path(init_from).expanduser() / "policy"
    if not is_adapter_dir(policy):
        raise ConfigError(
            "init_from",
            f"{init_from} holds a full model, and lm.lora trains adapters on lm.model: "
            "init_from a LoRA run's checkpoint, or `rlft-ray export` this one and make it lm.model",
        )
    trained_on = adapter_base(policy)
    if base_path is not None and _same_model(trained_on, base_path) is False:
        raise ConfigError(
            "init_from",
            f"{init_from}'s adapters were trained on {trained_on}, this run's lm.model is "
            f"{base_path}: adapters only fit the base they were trained on",
        )


def _same_model(a: str, b: str) -> bool | None:
    """Whether two model references name the same model (None: cannot tell)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    if not os.path.exists(a) and not os.path.exists(b):
        return a == b
    return False


def apply_lora(model: nn.Module, lora: LoRAConfig, base_path: str | None = None) -> nn.Module:
    """Wrap ``model`` in a ``peft`` LoRA model; only the adapters require grad.

    Args:
        model: A causal LM (``PreTrainedModel``).
        lora: The ``lm.lora`` section (``r > 0``).
        base_path: Where the base model loads from, written into the adapter directory's
            ``adapter_config.json`` so a checkpoint finds its base (made absolute when local).

    Raises:
        ConfigError: peft missing, or a target module the model does not have.
    """
    peft = require_peft()
    check_targets(model, lora)
    targets = (
        "all-linear" if tuple(lora.target_modules) == ("all-linear",) else list(lora.target_modules)
    )
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    training = model.training
    with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out and says so
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config)
    wrapped.train(training)  # peft's new modules start in train mode; keep the model's
    if base_path is not None:
        local = os.path.exists(base_path)
        wrapped.peft_config[ADAPTER_NAME].base_model_name_or_path = (
            os.path.abspath(base_path) if local else base_path
        )
    return wrapped


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a ``peft`` model by parameter name: what training changes,
    what the learner publishes and what an actor copies into."""
    return {n: p for n, p in model.named_parameters() if LORA_MARK in n}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of :func:`adapter_tensors`."""
    return {n: p.detach().cpu().clone() for n, p in adapter_tensors(model).items()}


def load_adapter_dir(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Copy an adapter directory's weights into the ``peft`` model ``model`` (same rank
    and targets), checking that exactly its adapter tensors are there.

    Raises:
        ValueError: Missing, unexpected or differently shaped adapter tensors.
    """
    from safetensors.torch import load_file

    peft = require_peft()
    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    own = peft.get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{directory}: adapters do not fit this run's lm.lora (other r or target_modules?): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}"
        )
    peft.set_peft_model_state_dict(model, tensors)


def adapter_base(directory: str | os.PathLike[str]) -> str:
    """The base model an adapter directory was trained on (``base_model_name_or_path``)."""
    config = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{directory}/{ADAPTER_CONFIG} names no base model")
    return str(base)


def load_merged(directory: str | os.PathLike[str], model_kwargs: dict[str, Any]) -> nn.Module:
    """A plain causal LM: the adapter directory's base model with the adapters merged in.

    Raises:
        FileNotFoundError: The base model named in ``adapter_config.json`` is gone.
    """
    from transformers import AutoModelForCausalLM

    peft = require_peft()
    base = adapter_base(directory)
    if os.path.isabs(base) and not os.path.exists(base):  # local bases are written absolute
        raise FileNotFoundError(
            f"{directory} holds LoRA adapters of the base model {base}, which no longer exists"
        )
    model = AutoModelForCausalLM.from_pretrained(base, **model_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(model, str(directory))
    return wrapped.merge_and_unload()


class LoRAReference(nn.Module):
    """The KL reference of a LoRA policy without a second model: the policy's own module
    run with its adapters disabled, or with stored reference adapters swapped in.

    ``state_dict`` is the reference adapters only (what a checkpoint stores when the
    reference moves, e.g. online DPO's refreshes).

    Args:
        policy: The learner's :class:`~rlft_ray.lm.policy.PolicyWithValueHead` around the
            ``peft`` model (held outside the module tree: not a submodule, not saved).
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._policy = [policy]  # a list: keeps it out of modules() / state_dict()
        self.adapters: dict[str, torch.Tensor] | None = None  # None: adapters disabled

    @property
    def peft_model(self) -> nn.Module:
        return self._policy[0].lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        temperature: float = 1.0,
        entropy: bool = False,
        completions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The log-probs of ``targets`` under the reference (no value head; arguments as in
        :meth:`~rlft_ray.lm.policy.PolicyWithValueHead.forward`)."""
        with torch.no_grad(), self.active():
            logps, ent, _ = self._policy[0](
                input_ids, attention_mask, targets, temperature, entropy, completions
            )
        return logps, ent, None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside, the policy module computes the reference: adapters off, or swapped."""
        if self.adapters is None:
            with self.peft_model.disable_adapter():
                yield
            return
        # in-place swaps bump the parameters' autograd versions: only between updates
        assert not torch.is_grad_enabled(), "the LoRA reference runs under torch.no_grad()"
        live = adapter_tensors(self.peft_model)
        saved = {n: p.detach().clone() for n, p in live.items()}
        try:
            for n, p in live.items():
                p.copy_(self.adapters[n])
            yield
        finally:
            for n, p in live.items():
                p.copy_(saved[n])

    def set_from_policy(self) -> None:
        """The reference becomes the policy as it is now."""
        self.adapters = adapter_state(self.peft_model)

    def load_adapter_dir(self, directory: str | os.PathLike[str]) -> None:
        """The reference becomes base + the adapters of ``directory`` (an ``init_from``'s
        policy): loaded through the policy module, which is put back afterwards."""
        saved = adapter_state(self.peft_model)
        load_adapter_dir(self.peft_model, directory)
        self.adapters = adapter_state(self.peft_model)
        with torch.no_grad():
            for n, p in adapter_tensors(self.peft_model).items():
                p.copy_(saved[n])

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The reference adapters (the starting adapters when they are disabled: B = 0
        makes them the base model exactly)."""
        if self.adapters is not None:
            return dict(self.adapters)
        return {
            n: torch.zeros_like(p) if ".lora_B." in n else p.detach().cpu().clone()
            for n, p in adapter_tensors(self.peft_model).items()
        }

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Restore :meth:`state_dict` (all-zero B: back to adapters disabled)."""
        own = adapter_tensors(self.peft_model)
        if set(state) != set(own):
            raise ValueError("reference adapters do not fit this run's lm.lora")
        zero_b = all(not v.any() for n, v in state.items() if ".lora_B." in n)
        self.adapters = None if zero_b else {k: v.detach().cpu().clone() for k, v in state.items()}
        return None


def lora_of(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model (has adapters)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
