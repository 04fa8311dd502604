"""In-place weight reload of a vLLM engine (runs inside vLLM's worker).

vLLM's own ``reload_weights`` rebuilds the model layer by layer (every parameter
re-materialised, every checkpoint tensor through the model's ``load_weights``, then each
layer's ``process_weights_after_loading``): on the CPU backend a weight sync of
SmolLM2-135M took 10 s on a loaded machine. :func:`direct_reload` writes the new tensors
straight into the engine's parameters instead:

* the shards of a fused projection (``q/k/v_proj`` -> ``qkv_proj``, ``gate/up_proj`` ->
  ``gate_up_proj``, read off the model's ``packed_modules_mapping``) are concatenated in
  their order along the output dimension (one tensor-parallel rank: the whole weight);
* a linear layer whose weight the CPU backend packed for its GEMM kernel (oneDNN, or
  sgl-kernel with AMX; the layer keeps only ``cpu_linear`` and an empty ``weight``) is
  given the full new weight and packed again by vLLM's own
  ``dispatch_cpu_unquantized_gemm`` (the packed copy does not follow the original
  tensor, so a repack is the one step that cannot be skipped);
* every other parameter (norms, embeddings, biases) is copied into in place, rows
  beyond the checkpoint's vocabulary (vLLM pads it) left as they are; the LM head (tied
  to the embedding or not) is repacked after its copy.

Where a name or shape does not map (another architecture's naming, LoRA layers,
quantized weights, a device other than CPU), it returns False having changed nothing,
and :class:`WeightReloadExtension` falls back to vLLM's ``reload_weights``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

#: ``rlft_load_weights``'s answer: which path ran.
DIRECT, LAYERWISE = "direct", "layerwise"


def _shard_targets(model: Any) -> dict[str, tuple[str, int, int]]:
    """Checkpoint module leaf -> (fused leaf, shard index, shard count), from
    ``packed_modules_mapping`` (e.g. ``k_proj`` -> ``("qkv_proj", 1, 3)``)."""
    packed: Mapping[str, Sequence[str]] = getattr(model, "packed_modules_mapping", {}) or {}
    targets = {}
    for fused, parts in packed.items():
        for i, part in enumerate(parts):
            targets[part] = (fused, i, len(parts))
    return targets


def plan_reload(
    model: torch.nn.Module, weights: Sequence[tuple[str, torch.Tensor]]
) -> dict[tuple[str, str], list[torch.Tensor]] | None:
    """``(module name, parameter name) -> the tensors whose concatenation along dim 0 is
    its new value`` (one tensor, or a fused weight's shards in order) for every parameter
    the checkpoint tensors write, or None where one does not map onto the engine's model."""
    modules = dict(model.named_modules())
    shard_of = _shard_targets(model)
    shards: dict[tuple[str, str], list[torch.Tensor | None]] = {}
    plan: dict[tuple[str, str], list[torch.Tensor]] = {}
    for name, value in weights:
        module_name, _, param = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        if module_name not in modules and leaf in shard_of:
            fused, index, count = shard_of[leaf]
            key = (f"{parent}.{fused}" if parent else fused, param)
            shards.setdefault(key, [None] * count)[index] = value
        else:
            plan[(module_name, param)] = [value]
    for key, parts in shards.items():
        if any(p is None for p in parts):
            return None  # a fused weight with a shard missing: not a full update
        plan[key] = parts  # type: ignore[assignment]
    for module_name, param in plan:
        module = modules.get(module_name)
        if module is None or "base_layer" in module_name or hasattr(module, "base_layer"):
            return None
        if param not in dict(module.named_parameters(recurse=False)):
            return None
    return plan


def _expected_shape(module: torch.nn.Module, param: str) -> tuple[int, ...]:
    """The full shape of ``module.param`` (a packed linear weight's is its logical
    ``[out, in]``, the parameter itself being empty)."""
    tensor = getattr(module, param)
    if param == "weight" and tensor.numel() == 0 and hasattr(module, "output_partition_sizes"):
        return (sum(module.output_partition_sizes), module.input_size_per_partition)
    return tuple(tensor.shape)


def _fits(module: torch.nn.Module, param: str, parts: list[torch.Tensor]) -> bool:
    """Whether ``parts`` (concatenated along dim 0) fill ``module.param``: same shape,
    or the leading rows of a vocabulary padded by vLLM."""
    shape = _expected_shape(module, param)
    if not shape:  # a scalar parameter
        return len(parts) == 1 and parts[0].dim() == 0
    if any(p.dim() != len(shape) or tuple(p.shape[1:]) != shape[1:] for p in parts):
        return False
    rows = sum(p.shape[0] for p in parts)
    if rows == shape[0]:
        return True
    return len(parts) == 1 and rows <= shape[0] and hasattr(module, "num_embeddings_padded")


def _repack(module: torch.nn.Module, weight: torch.Tensor | None) -> None:
    """Pack ``module``'s GEMM weight again (``weight``: the new full tensor of a layer
    whose packed copy replaced its parameter; None: the parameter holds it)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    if weight is None:
        dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        return
    module.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(module, remove_weight=True)
    kept = module.weight
    if kept.numel() and kept.data_ptr() == weight.data_ptr():  # unpacked (torch fallback):
        module.weight = torch.nn.Parameter(kept.clone(), requires_grad=False)  # own copy


def _uses_packed_gemm(module: torch.nn.Module) -> bool:
    """A module the CPU backend runs through a packed GEMM (a linear layer or the LM
    head; the input embedding also got a handler at load, which lookups never use)."""
    if not hasattr(module, "cpu_linear"):
        return False
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    return not isinstance(module, VocabParallelEmbedding) or isinstance(module, ParallelLMHead)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch (OpenMP) runs one thread inside the block, the engine's count after it.

    Packing and concatenating weights are memory copies: with two OpenMP threads on a
    loaded machine they took 4x the CPU seconds of one (threads spin at each barrier
    while the other waits for a core). vLLM's CPU worker turns ``torch.set_num_threads``
    into a no-op, so this calls the builtin underneath it."""
    threads = torch.get_num_threads()
    torch._C.set_num_threads(1)
    try:
        yield
    finally:
        torch._C.set_num_threads(threads)


@torch.no_grad()
def direct_reload(model: torch.nn.Module, weights: Sequence[tuple[str, torch.Tensor]]) -> bool:
    """Write checkpoint-format tensors into the engine's model in place (module
    docstring), on one thread (:func:`one_thread`); returns False, with the model
    untouched, where they do not map."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    modules = dict(model.named_modules())
    with one_thread():
        plan = plan_reload(model, weights)
        if plan is None or not all(_fits(modules[m], p, v) for (m, p), v in plan.items()):
            return False
        _write(modules, plan)
    return True


def _write(
    modules: dict[str, torch.nn.Module], plan: dict[tuple[str, str], list[torch.Tensor]]
) -> None:
    """Copy (or repack) each planned tensor into its parameter, then repack the heads
    whose weight changed."""
    changed: dict[int, torch.Tensor] = {}  # id of each parameter written -> itself
    for (module_name, param), parts in plan.items():
        module = modules[module_name]
        target = getattr(module, param)
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # one at a time
        if param == "weight" and target.numel() == 0 and hasattr(module, "cpu_linear"):
            _repack(module, value.to(target.dtype))
            continue
        (target.data[: value.shape[0]] if value.dim() else target.data).copy_(value)
        changed[id(target)] = target
    for module in modules.values():  # heads packed from a parameter written above
        weight = getattr(module, "weight", None)
        if weight is not None and id(weight) in changed and _uses_packed_gemm(module):
            _repack(module, None)


class WeightReloadExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``): in-place weight reload.

    Runs inside the worker; :meth:`~rlft_ray.rollout.vllm_engine.VLLMEngine.load_weights`
    calls it through ``LLM.collective_rpc``. Importable without vLLM, so the engine can
    name it by its qualified name.
    """

    def rlft_load_weights(self, weights: list[tuple[str, torch.Tensor]], direct: bool) -> str:
        """Load checkpoint-format (Hugging Face) named tensors: :func:`direct_reload`
        when ``direct`` and they map, else vLLM's layer-by-layer ``reload_weights``.
        Returns the path taken (:data:`DIRECT` or :data:`LAYERWISE`)."""
        runner = self.model_runner  # type: ignore[attr-defined]
        if direct and direct_reload(runner.get_model(), weights):
            return DIRECT
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return LAYERWISE
