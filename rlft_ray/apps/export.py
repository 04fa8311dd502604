"""``rlft-ray export CKPT OUT``: an LM checkpoint as a plain ``save_pretrained`` directory
(``--format rllib``: a gym policy as an RLlib RLModule checkpoint, :func:`export_rllib`).

The result loads with ``from_pretrained`` (or an inference server that reads Hugging Face
directories): the policy's weights, its tokenizer and the model's own generation config
(the base model's ``generation_config.json``, not the run's sampling caps: a training run's
``max_new_tokens: 16`` would cut every downstream answer short), without the learner's
extras (value head, optimizer, RNG, counters). The run's sampling settings are in the
README it writes. Files get the usual permissions (0644 / 0755 under the umask).
Only data is read from the checkpoint: the model class is the transformers class its
``config.json`` names, never remote code, and ``config.yaml`` is read as YAML.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from rlft_ray.config import ConfigError
from rlft_ray.core.fileio import atomic_write_text
from rlft_ray.lm.loading import neutral_generation_config
from rlft_ray.lm.lora import adapter_base, is_adapter_dir, load_merged

USAGE = """# {name}

Exported by `rlft-ray export` from `{checkpoint}` (algo: {algo}, iteration {iteration}).

```python
from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```

`generation_config.json` is the base model's own. The run sampled with {sampling}.
"""


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write ``checkpoint``'s policy to ``out`` as a ``save_pretrained`` directory.

    Args:
        checkpoint: An LM run's checkpoint directory (with ``policy/``), e.g.
            ``runs/g/checkpoint_best``; a LoRA run's adapters are merged into their base.
        out: A new (or empty) directory; written whole or not at all.

    Returns:
        ``{"out", "architecture", "parameters", "generation", "lora_merged"}``.

    Raises:
        ConfigError: Naming ``checkpoint`` or ``out``: not an LM checkpoint, an
            architecture transformers does not know, or ``out`` not empty.
    """
    from transformers import AutoTokenizer

    src, dest = Path(checkpoint), Path(out)
    policy = src / "policy"
    lora = is_adapter_dir(policy)
    if not lora and not (policy / "config.json").is_file():
        what = (
            "a small gym policy (policy.safetensors)"
            if (src / "policy.safetensors").is_file()
            else "no policy/ directory"
        )
        raise ConfigError("checkpoint", f"{src} is not an LM checkpoint: {what}")
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError("out", f"{dest} is not empty; choose a new directory")
    model, arch = _load_policy(policy, lora)
    run, state = _read_yaml(src / "config.yaml"), _read_yaml(src / "state.json")
    lm = run.get("lm") or {}
    sampling = _run_sampling(lm)
    model.generation_config = _own_generation_config(model, lm.get("model"), policy)
    generation = {
        k: v
        for k, v in model.generation_config.to_diff_dict().items()
        if k != "transformers_version"
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(policy).save_pretrained(tmp)
        auto = (
            "AutoModelForCausalLM"
            if arch.endswith("LMHeadModel") or arch.endswith("ForCausalLM")
            else "AutoModelForSequenceClassification"
        )
        atomic_write_text(
            tmp / "README.md",
            USAGE.format(
                name=dest.name,
                checkpoint=src,
                algo=run.get("algo", "?"),
                iteration=(state.get("counters") or {}).get("iteration", "?"),
                auto=auto,
                out=dest,
                sampling=", ".join(f"{k}={v}" for k, v in sampling.items()),
            ),
        )
        _usual_permissions(tmp)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(dest),
        "architecture": arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "generation": generation,
        "trained_with": sampling,
        "lora_merged": lora,
    }


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping as plain data; empty when the file is absent."""
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _run_sampling(lm: dict[str, Any]) -> dict[str, Any]:
    """The run's sampling settings (for the README, not the generation config)."""
    return {
        "temperature": float(lm.get("temperature", 1.0)),
        "top_p": float(lm.get("top_p", 1.0)),
        "max_new_tokens": int(lm.get("max_new_tokens", 64)),
    }


def _own_generation_config(model: Any, base: str | None, policy: Path) -> Any:
    """The base model's own ``GenerationConfig`` (``lm.model``'s, read offline), else the
    policy directory's, else one with only the model's special tokens."""
    from transformers import GenerationConfig

    for source in (base, policy):
        if not source:
            continue
        try:
            return GenerationConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError):
            continue
    return neutral_generation_config(model.generation_config)


def _usual_permissions(root: Path) -> None:
    """0755 directories and 0644 files under the umask (``mkdtemp`` made the folder 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _load_policy(policy: Path, lora: bool) -> tuple[Any, str]:
    """The checkpoint's policy model (LoRA: its base with the adapters merged) and its
    architecture name, loading only classes transformers ships."""
    import transformers
    from transformers import AutoConfig

    # a LoRA checkpoint: the base model its adapter_config.json names, adapters merged in
    config = AutoConfig.from_pretrained(adapter_base(policy) if lora else policy)
    arch = (config.architectures or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        raise ConfigError(
            "checkpoint", f"{policy}: architecture {arch!r} is not a transformers class"
        )
    try:
        model = (
            load_merged(policy, {"trust_remote_code": False})
            if lora
            else model_cls.from_pretrained(policy, trust_remote_code=False)
        )
    except (OSError, ValueError) as exc:
        raise ConfigError("checkpoint", f"cannot load {policy}: {exc}") from exc
    return model, arch


def export_rllib(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write a gym checkpoint's policy (``algo: ppo`` / ``dqn`` / ``filtered_bc``) as an RLlib
    RLModule checkpoint: ``RLModule.from_checkpoint(out)`` loads it and acts as the policy
    does (:func:`~rlft_ray.learners.rllib_ckpt.export_rllib_module`).

    Raises:
        ConfigError: Naming ``checkpoint`` (not a gym policy) or ``out`` (not empty).
    """
    from rlft_ray.learners import checkpoint as ckpt
    from rlft_ray.learners.base import Spaces
    from rlft_ray.learners.registry import get_learner_cls
    from rlft_ray.learners.rllib import require_rllib
    from rlft_ray.learners.rllib_ckpt import export_rllib_module
    from rlft_ray.rollout.env_runner import probe_spaces

    src, dest = Path(checkpoint), Path(out)
    if not (src / "policy.safetensors").is_file():
        raise ConfigError("checkpoint", f"{src} holds no gym policy (policy.safetensors)")
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError("out", f"{dest} is not empty; choose a new directory")
    require_rllib()
    cfg = ckpt.load_config_from_checkpoint(src)
    spaces = Spaces(*probe_spaces(cfg.env))
    policy = get_learner_cls(cfg.algo).make_policy(cfg, spaces)
    ckpt.load_modules(src, {"policy": policy}, names=["policy"])
    policy.eval()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        module = export_rllib_module(policy, spaces.observation, spaces.action, tmp / "module")
        if dest.exists():
            dest.rmdir()  # empty, checked above
        (tmp / "module").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(dest),
        "format": "rllib",
        "module": module,
        "algo": cfg.algo,
        "env": cfg.env.id,
        "load_with": f"RLModule.from_checkpoint({str(dest)!r})",
    }


def command(args: argparse.Namespace) -> int:
    from rlft_ray.apps.export import export_checkpoint

    if getattr(args, "format", "hf") == "rllib":
        print(json.dumps(export_rllib(args.checkpoint, args.out), indent=2))
        return 0
    from rlft_ray.lm import quiet_transformers

    quiet_transformers()
    print(json.dumps(export_checkpoint(args.checkpoint, args.out), indent=2))
    return 0
