"""GGUF files as models: dequantized once into a cached ``save_pretrained`` directory.

``lm.model: path/to/model.Q4_1.gguf`` works wherever a model directory does:
:func:`resolve_gguf` dequantizes the file to the requested dtype with transformers (which
reads GGUF through the ``gguf`` package), saves model, tokenizer (chat template
included) and generation config with ``save_pretrained``, and returns that directory.
The directory is keyed by the file's SHA-256 and the dtype, written to a temp directory
and renamed into place under a file lock, so the driver, the generation actors and the
learners of one machine convert once and then load the same bytes.

The cache is ``$RLFT_RAY_CACHE/gguf`` (default ``~/.cache/rlft_ray/gguf``); an entry is
``<sha256>-<dtype>/`` with a ``rlft_ray_gguf.json`` naming its source file.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from rlft_ray.config import ConfigError
from rlft_ray.core.fileio import atomic_write_json, replace_dir
from rlft_ray.lm.cache import cache_root, file_lock, sha256_file

#: First four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
#: Written last into each converted directory: where it came from.
SOURCE_FILE = "rlft_ray_gguf.json"
#: dtypes a GGUF file is dequantized to (``auto`` / ``None`` mean ``float32``: the
#: dequantized values are float32, any other dtype rounds them).
GGUF_DTYPES = ("float32", "bfloat16", "float16")
_INSTALL_HINT = "pip install gguf (or pip install 'rlft-ray[real]')"


def is_gguf_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix, any case)."""
    return os.fspath(path).lower().endswith(".gguf")


def gguf_dtype_name(dtype: str | torch.dtype | None) -> str:
    """The dtype name a GGUF file is converted to: ``float32`` for ``None`` / ``"auto"``.

    Raises:
        ConfigError: (``lm.dtype``) A dtype outside :data:`GGUF_DTYPES`.
    """
    if dtype is None or dtype == "auto":
        return "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in GGUF_DTYPES:
        raise ConfigError(
            "lm.dtype", f"a GGUF model converts to one of {', '.join(GGUF_DTYPES)}, not {name!r}"
        )
    return name


def check_gguf_file(path: str | os.PathLike[str], key: str = "lm.model") -> Path:
    """``path`` (``~`` expanded, absolute) once it is an existing file starting with the
    GGUF magic bytes.

    Raises:
        ConfigError: Naming ``key``: missing, not a file, or not GGUF.
    """
    file = Path(os.path.expanduser(os.fspath(path))).absolute()
    if not file.exists():
        raise ConfigError(key, f"GGUF file does not exist: {path}")
    if not file.is_file():
        raise ConfigError(key, f"{path} ends in .gguf but is not a file")
    with open(file, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ConfigError(
            key, f"{path} is not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})"
        )
    return file


def _require_packages(key: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``gguf`` and ``accelerate`` import
    (transformers needs both to read a GGUF file)."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            key, f"reading a .gguf model needs the `gguf` package: {_INSTALL_HINT}"
        ) from exc
    try:
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            key,
            "transformers reads .gguf models only with `accelerate`: pip install 'rlft-ray[real]'",
        ) from exc


def _supported_architectures() -> list[str]:
    """GGUF architectures this transformers dequantizes (empty when it does not say)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return []
    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})


def _conversion_error(file: Path, dtype: str, key: str, exc: Exception) -> ConfigError:
    """The :class:`ConfigError` for a failed conversion: an architecture transformers cannot
    dequantize (its ``ValueError`` says "not supported") gets the list of those it can."""
    import transformers

    if isinstance(exc, ValueError) and "not supported" in str(exc):
        return ConfigError(
            key,
            f"{file}: {exc} transformers {transformers.__version__} dequantizes GGUF "
            f"architectures {', '.join(_supported_architectures())}",
        )
    return ConfigError(key, f"cannot convert GGUF {file} to {dtype}: {type(exc).__name__}: {exc}")


def _dequantize_kwargs() -> dict[str, Any]:
    """``from_pretrained`` keywords that dequantize every weight: transformers 5 may keep
    a GGUF's weights packed (``GgufConfig(dequantize=False)``), which cannot be saved."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantization_marker(model: Any) -> None:
    """Make a dequantized GGUF model an ordinary one: ``save_pretrained`` refuses models
    whose quantizer is not serializable, and a saved ``quantization_config`` would send
    the next ``from_pretrained`` back to the GGUF loader. The weights are plain tensors."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    vars(model.config).pop("quantization_config", None)


def convert_gguf(file: Path, out: Path, dtype: str) -> None:
    """Dequantize the GGUF ``file`` to ``dtype`` and ``save_pretrained`` model (safetensors,
    config, generation config) and tokenizer (with its chat template) into ``out``.

    Not atomic: :func:`resolve_gguf` calls it on a temp directory. An architecture
    transformers cannot dequantize raises its ``ValueError`` while the metadata is parsed,
    before any tensor is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, dtype), **_dequantize_kwargs()
    )
    _drop_quantization_marker(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_cache_dir(
    sha256: str, dtype: str, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the conversion of the file with hash ``sha256`` to ``dtype`` lives."""
    return cache_root(cache_dir) / "gguf" / f"{sha256}-{dtype}"


def resolve_gguf(
    path: str | os.PathLike[str],
    dtype: str | torch.dtype | None = "float32",
    key: str = "lm.model",
    cache_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The ``save_pretrained`` directory of the GGUF file ``path`` dequantized to ``dtype``,
    converted on the first call and reused by every later one (any process).

    Args:
        path: A ``.gguf`` file (``~`` expanded).
        dtype: ``float32`` / ``bfloat16`` / ``float16`` (``None`` / ``"auto"``: float32),
            a name or a ``torch.dtype``.
        key: Config key the errors name.
        cache_dir: Cache root instead of ``$RLFT_RAY_CACHE`` / ``~/.cache/rlft_ray``.

    Returns:
        The converted directory (loads with ``from_pretrained``).

    Raises:
        ConfigError: Naming ``key``: a missing or non-GGUF file, ``gguf`` not installed,
            an architecture transformers cannot dequantize, or a failed conversion;
            naming ``lm.dtype`` for an unsupported dtype.
    """
    file = check_gguf_file(path, key)
    dtype_name = gguf_dtype_name(dtype)
    sha256 = sha256_file(file)
    dest = gguf_cache_dir(sha256, dtype_name, cache_dir)
    if dest.is_dir():  # renamed into place only once complete
        return str(dest)
    _require_packages(key)
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if dest.is_dir():  # another process converted it while this one waited
            return str(dest)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            convert_gguf(file, tmp, dtype_name)
            atomic_write_json(
                tmp / SOURCE_FILE,
                {"source": str(file), "sha256": sha256, "dtype": dtype_name},
            )
            replace_dir(tmp, dest)
        except Exception as exc:  # ValueError, OSError, ...: one message naming the key
            raise _conversion_error(file, dtype_name, key, exc) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def gguf_source(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``rlft_ray_gguf.json`` record of a converted directory, or None for any other."""
    record = Path(directory) / SOURCE_FILE
    return json.loads(record.read_text()) if record.is_file() else None
