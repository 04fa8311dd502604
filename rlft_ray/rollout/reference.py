"""Reference log-probabilities of preference pairs, computed once on actors and cached.

DPO compares the policy with a frozen reference; computing the reference's log-probs once
before training (a Ray Data pass over an actor pool of :class:`ReferenceScorer` s) lets
the learner hold one model. The result is written next to the pair file as
``<pairs>.ref-<hash>.parquet``; the hash covers the pair file, the reference model's
files and the tokenization settings, so a later run with the same model and data reuses
it and a change (of model or data) can never pick up stale values: it recomputes.

The reference is computed in the learner's compute precision: a GPU learner computes
log pi under bf16 autocast, so its reference does too (on the actors' GPUs when they
hold one, with the learner's own autocast; else under CPU bf16 autocast, the same
precision from other kernels); a CPU learner's stays fp32. In fp32 against a bf16
policy, the implicit rewards at step 0 (policy == reference) would be rounding noise
instead of 0. The precision is part of the cache key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from rlft_ray.config import LMConfig
from rlft_ray.core.fileio import atomic_write
from rlft_ray.core.torch_utils import hold_threads
from rlft_ray.lm.lora import adapter_base, is_adapter_dir

logger = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen", "ref_rejected")


class ReferenceScorer:
    """Summed log pi_ref(completion | prompt) of chosen and rejected, for Ray Data batches.

    Args:
        model_path: The reference model (``save_pretrained`` directory or hub id).
        lm: The ``lm`` section (tokenizer, ``trust_remote_code``).
        num_threads: torch threads (the CPUs this actor holds).
        micro_batch_size: Pairs per forward pass.
        device: ``"cpu"`` or ``"cuda"`` (bf16 autocast there, as the learner's forward).
        bf16: Compute under bf16 autocast, as a GPU learner computes the policy's log-probs.
    """

    def __init__(
        self,
        model_path: str,
        lm: LMConfig,
        num_threads: int = 1,
        micro_batch_size: int = 32,
        device: str = "cpu",
        bf16: bool = False,
    ) -> None:
        from rlft_ray.lm import quiet_transformers
        from rlft_ray.lm.loading import load_model_and_tokenizer
        from rlft_ray.lm.policy import PolicyWithValueHead

        quiet_transformers()
        hold_threads(num_threads)
        model, tok = load_model_and_tokenizer(
            model_path, trust_remote_code=lm.trust_remote_code, tokenizer_path=lm.tokenizer
        )
        self.device = torch.device(device)
        self.net = PolicyWithValueHead(model.float().eval()).to(self.device)
        self.pad_id = int(tok.pad_token_id)
        self.micro = micro_batch_size
        self.bf16 = bf16

    @torch.no_grad()
    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        """``rows`` (a prepared pair table) with ``ref_chosen`` / ``ref_rejected`` added."""
        from rlft_ray.lm.pairs import pair_batch, pair_tensors, rows_of
        from rlft_ray.lm.policy import pair_logps

        t = pair_tensors(pair_batch(rows, self.pad_id), self.device)
        chosen, rejected = [], []
        precision = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        for idx in torch.split(torch.arange(len(rows), device=self.device), self.micro):
            with precision:  # on CUDA pair_logps autocasts to bf16 itself, as the learner's
                c, r, _ = pair_logps(self.net, rows_of(t, idx))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        out = rows.copy()
        out["ref_chosen"] = torch.cat(chosen).numpy() if chosen else []
        out["ref_rejected"] = torch.cat(rejected).numpy() if rejected else []
        return out


def _digest_path(h: Any, path: Path) -> None:
    """Feed a file's bytes, or every file of a directory (sorted), into the hash."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def reference_hash(model_path: str, lm: LMConfig, bf16: bool = False) -> str:
    """What the reference log-probs depend on: pair file, model files, tokenization
    settings and the compute precision (``bf16``: a GPU learner's)."""
    h = hashlib.sha256()
    settings: dict[str, Any] = {
        "max_prompt_tokens": lm.max_prompt_tokens,
        "max_completion_tokens": lm.max_completion_tokens,
        "pair_overflow": lm.pair_overflow,
        "drop_invalid_pairs": lm.drop_invalid_pairs,
        "tokenizer": lm.tokenizer,
    }
    if bf16:  # only then: fp32 caches written before the precision was keyed stay valid
        settings["compute"] = "bf16"
    h.update(json.dumps(settings, sort_keys=True).encode())
    _digest_path(h, Path(lm.pairs or ""))
    model = Path(model_path)
    if model.exists():
        _digest_path(h, model)
        if is_adapter_dir(model) and Path(adapter_base(model)).exists():  # LoRA: and its base
            _digest_path(h, Path(adapter_base(model)))
    else:  # a hub id: its name (a hub revision changes under the same name: pass a path)
        h.update(model_path.encode())
    return h.hexdigest()[:16]


def cache_path(lm: LMConfig, digest: str) -> Path:
    """Where the reference log-probs of ``lm.pairs`` with this hash are kept."""
    pairs = Path(lm.pairs or "pairs")
    return pairs.with_name(f"{pairs.name}.ref-{digest}.parquet")


def attach_reference_logps(
    table: pd.DataFrame,
    model_path: str,
    lm: LMConfig,
    actors: int,
    cpus_per_actor: float,
    fallback_dir: Path,
    bf16: bool = False,
    gpus_per_actor: float = 0.0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``table`` with ``ref_chosen`` / ``ref_rejected`` columns: from the cache when it
    matches, else computed on ``actors`` Ray Data actors and cached.

    Args:
        table: The prepared pair table (``pair_index``, token id columns).
        model_path: The reference model.
        lm: The ``lm`` section (``pairs`` names the file the cache sits next to).
        actors: Actor pool size. cpus_per_actor: CPUs each holds.
        fallback_dir: Where the cache goes when the pair file's folder is not writable (the
            run directory); if neither is, the run goes on without a cache.
        bf16: Compute under bf16 autocast (the learner's precision on a GPU).
        gpus_per_actor: GPUs each actor holds (> 0: it computes on its GPU).

    Returns:
        The table, and ``summary.json`` notes (cache file, whether it was reused).
    """
    digest = reference_hash(model_path, lm, bf16)
    path = cache_path(lm, digest)
    if not path.is_file():
        fallback = fallback_dir / path.name
        path = fallback if fallback.is_file() else path
    if path.is_file():
        refs = pd.read_parquet(path)
        if refs.attrs.get("rlft_ref_hash", digest) == digest and set(table["pair_index"]) <= set(
            refs["pair_index"]
        ):
            merged = table.merge(refs[["pair_index", *REF_COLUMNS]], on="pair_index", how="left")
            return merged, {"ref_logps/cache": str(path), "ref_logps/reused": True}
        logger.warning("reference log-probs in %s do not match; recomputing", path)
    scored = _score_on_actors(table, model_path, lm, actors, cpus_per_actor, bf16, gpus_per_actor)
    written = _write_cache(scored[["pair_index", *REF_COLUMNS]], path, fallback_dir, digest)
    return scored, {"ref_logps/cache": str(written) if written else None, "ref_logps/reused": False}


def _score_on_actors(
    table: pd.DataFrame,
    model_path: str,
    lm: LMConfig,
    actors: int,
    cpus: float,
    bf16: bool,
    gpus: float,
) -> pd.DataFrame:
    import ray.data

    from rlft_ray.core.torch_utils import torch_threads

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    k = 64
    blocks = [table.iloc[i : i + k] for i in range(0, len(table), k)]
    dataset = ray.data.from_pandas(blocks).map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={
            "model_path": model_path,
            "lm": lm,
            "num_threads": torch_threads(cpus),
            "device": "cuda" if gpus > 0 else "cpu",
            "bf16": bf16,
        },
        batch_size=k,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=4),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    scored = pd.concat(list(dataset.iter_batches(batch_format="pandas", batch_size=None)))
    return scored.sort_values("pair_index").reset_index(drop=True)


def _write_cache(refs: pd.DataFrame, path: Path, fallback_dir: Path, digest: str) -> Path | None:
    """Write the cache atomically next to the pairs, or into ``fallback_dir`` if that fails;
    None (with a warning) if neither can be written: the run itself does not need it."""
    refs = refs.copy()
    refs.attrs["rlft_ref_hash"] = digest
    for target in (path, fallback_dir / path.name):
        try:
            atomic_write(target, lambda tmp: refs.to_parquet(tmp, index=False))
            return target
        except OSError:
            continue
    logger.warning("cannot cache the reference log-probs in %s or %s", path.parent, fallback_dir)
    return None
