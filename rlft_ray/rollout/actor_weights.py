"""Loading published weights into a generation actor (:class:`WeightLoading`, a mixin of
:class:`~rlft_ray.rollout.generation.GenerationActor`): tensors from the object store, or a
shared-memory slot read in place, or with one slot taken as the parameters' own storage;
LoRA adapters merged or served; a vLLM engine reloaded."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlft_ray.core.torch_utils import weights_from_wire
from rlft_ray.rollout.shared_weights import SharedSlot, StaleWeightsError
from rlft_ray.rollout.weight_timing import TimedWeightLoads
from rlft_ray.types import UNSYNCED_VERSION

if TYPE_CHECKING:
    from rlft_ray.config import LMConfig
    from rlft_ray.rollout.vllm_engine import VLLMEngine


class WeightLoading(TimedWeightLoads):
    """The weights half of a generation actor; needs its ``model`` (or ``engine``), ``lm``,
    ``lora`` / ``merge_lora`` / ``merged``, ``_tensors``, ``_tensor_names``, ``_alias_of``,
    ``_aliased`` and ``_take_ilql_heads``."""

    lm: LMConfig
    engine: VLLMEngine | None
    policy_version: int

    def set_weights(self, weights: dict[str, Any] | SharedSlot, version: int) -> int:
        """Load published policy weights (tensors, numpy arrays or a shared-memory
        :class:`~rlft_ray.rollout.shared_weights.SharedSlot`); returns the version now held.

        Copies straight into the parameters (dtype and device converted on the way); a
        shared slot's tensors are read in place (no copy first). A one-slot file (a
        synchronous loop: the learner writes only while no actor samples) is not copied at
        all: the parameters become views of the slot's pages, one copy of the weights for
        the machine (``_load``'s ``alias``). With LoRA the weights are the adapters (merged
        into fp32 base weights after the copy). With ``lm.backend: vllm`` the engine
        reloads them in place.

        Raises:
            KeyError: The published weights do not name exactly this model's tensors.
            StaleWeightsError: The shared slot was overwritten while it was loaded; the
                actor then holds no known version (its group restores it).
        """
        if isinstance(weights, SharedSlot):
            try:
                with weights.borrowed() as views:
                    self._load(views, alias=weights.slots == 1)
            except StaleWeightsError:
                self.policy_version = UNSYNCED_VERSION
                raise
        else:
            self._load(weights_from_wire(weights))
        self.policy_version = version
        return version

    def _load(self, weights: dict[str, torch.Tensor], alias: bool = False) -> None:
        """Copy published tensors into the sampler (see :meth:`set_weights`); with
        ``alias``, a full model's tensors of the same dtype, shape and device take the
        published ones as their storage instead (the one-slot shared file's views)."""
        weights = self._take_ilql_heads(weights)  # an ILQL learner's heads (lm.decode=ilql)
        # tied weights travel once (the learner publishes the embedding, not the head)
        weights = {k: v for k, v in weights.items() if k not in self._alias_of}
        if weights.keys() != self._tensor_names:
            missing, extra = (
                sorted(self._tensor_names - weights.keys()),
                sorted(weights.keys() - self._tensor_names),
            )
            raise KeyError(
                f"published weights do not fit this model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        if self.engine is not None and self.lora:  # a new LoRARequest, base unchanged
            self.engine.load_adapters(weights, self.lm.lora.alpha)
        elif self.engine is not None:  # vLLM repacks every tensor: the tied head is sent too
            self.engine.load_weights(
                {**weights, **{a: weights[s] for a, s in self._alias_of.items()}}
            )
        if self.engine is not None:
            return
        with torch.no_grad():
            if self.merged:  # take the old adapters out before replacing them
                self.model.base_model.unmerge_adapter()
            alias = alias and not self.lora  # merging adapters writes into the base weights
            for name, value in weights.items():
                tensor = self._tensors[name]
                if alias and (tensor.dtype, tensor.shape, tensor.device) == (
                    value.dtype,
                    value.shape,
                    value.device,
                ):
                    tensor.data = value  # a tied twin is the same Parameter: it follows
                    self._aliased.add(name)
                elif name in self._aliased:  # own storage again: never write into the file
                    tensor.data = value.to(tensor.device, tensor.dtype, copy=True)
                    self._aliased.discard(name)
                else:
                    tensor.copy_(value)
            if self.merge_lora:  # W + (alpha / r) B A
                self.model.base_model.merge_adapter()
                self.merged = True

    def get_version(self) -> int:
        """The policy version this actor samples with."""
        return self.policy_version
