"""``rlft-ray sample``: rejection sampling as a stand-alone job over a prompt file.

The prompts go through Ray Data to a pool of generation actors (``map_batches`` with an
actor pool of ``resources.num_rollout_actors``); each actor generates ``lm.num_samples``
completions per prompt, scores them and applies the ``rsft`` selection rule. Layout of
``--output-dir``::

    config.yaml              the resolved run config
    parts/part-*.parquet     every sample of a batch of prompts: its reward, log-prob and
                             ``accepted`` flag, and its text when accepted; written
                             atomically as each batch arrives (what --resume reads)
    accepted.jsonl           the accepted samples in TRL's SFT field names (``prompt``,
      (or .parquet)          ``completion``) plus ``reward``, ``logprob``, ``policy_version``
    summary.json             counts, acceptance rate, rewards, throughput

A prompt counts as done when a part file holds all its samples, so ``--resume`` samples
only the rest and never duplicates a row.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from rlft_ray.config import ConfigError, RunConfig, build_config, save_config, to_dict
from rlft_ray.core.fileio import atomic_write, atomic_write_json, atomic_write_text
from rlft_ray.core.torch_utils import torch_threads
from rlft_ray.learners.lm_rank import PROMPTS
from rlft_ray.learners.rsft import RSFTLearner
from rlft_ray.rollout.sampling import SAMPLE_COLUMNS, BatchSampler
from rlft_ray.run.ray_session import init_ray
from rlft_ray.run.resources import check_fits

logger = logging.getLogger(__name__)

PARTS = "parts"
FORMATS = ("jsonl", "parquet")


def run_sampling(
    cfg: RunConfig,
    output_dir: str | Path,
    resume: bool = False,
    fmt: str = "jsonl",
    prompts_per_batch: int = 256,
    address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample, select and write the accepted set; returns ``summary.json``'s content.

    Args:
        cfg: Run config: ``lm`` (model, ``prompts``, sampling, reward), ``rsft`` (the
            selection rule), ``resources`` (actors, CPUs each), ``seed``.
        output_dir: Job directory (must be empty or absent unless ``resume``).
        resume: Continue a job that stopped: only prompts without a complete part run.
        fmt: ``jsonl`` or ``parquet`` for the accepted set.
        prompts_per_batch: Prompts per actor call (each call's samples are one part file).
        address: Ray address; default ``RAY_ADDRESS`` or embedded Ray.
        progress: Show a progress bar over prompts.

    Raises:
        ConfigError: Bad config, prompt file, output directory or ``--resume``.
    """
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise ConfigError("--format", f"must be one of {list(FORMATS)}, got {fmt!r}")
    if prompts_per_batch < 1:
        raise ConfigError("--prompts-per-batch", "must be >= 1")
    out = Path(output_dir).resolve()
    if not cfg.lm.prompts:  # without it the probe would set up LM-agent episodes
        raise ConfigError(
            "lm.prompts",
            "rlft-ray sample needs a prompt file; agent episodes are sampled by training runs",
        )
    probe = RSFTLearner.probe(cfg, training=False)  # model, prompts, reward fn, selection
    cfg = probe.cfg or cfg
    _check_output_dir(out, cfg, resume)
    table = probe.datasets[PROMPTS].reset_index(drop=True)
    table["prompt_index"] = range(len(table))
    done = completed_prompts(out, cfg.lm.num_samples) if resume else set()
    pending = table[~table["prompt_index"].isin(done)]
    if len(pending):
        init_ray(address)
        import ray

        check_fits(cfg.resources, ray.cluster_resources(), learners=False)
    if not resume:  # only now: a job that could not start leaves no directory behind
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    rate = {"samples": 0, "accepted": 0, "seconds": 0.0}
    if len(pending):
        rate = _sample_into_parts(cfg, pending, out, prompts_per_batch, progress, len(table))
    return _finish(cfg, out, fmt, time.perf_counter() - started, rate, probe.info)


def _check_output_dir(out: Path, cfg: RunConfig, resume: bool) -> None:
    """A fresh job needs an empty directory; ``--resume`` the same config as before."""
    saved = out / "config.yaml"
    if resume:
        if not saved.is_file():
            raise ConfigError("--resume", f"{out} holds no sampling job to resume (no config.yaml)")
        if yaml.safe_load(saved.read_text()) != to_dict(cfg):
            raise ConfigError(
                "--resume", f"the config differs from the one the job in {out} started with"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(
            "--output-dir",
            f"{out} is not empty; choose another directory or pass --resume to continue the job there",
        )


def completed_prompts(out: Path, num_samples: int) -> set[int]:
    """Prompt indices whose samples a part file holds in full.

    A part whose prompts are not all complete (an interrupted write cannot leave one, as
    parts are written atomically, but a split batch could) is removed: its prompts are
    sampled again rather than half-counted.
    """
    done: set[int] = set()
    for part in sorted((out / PARTS).glob("part-*.parquet")):
        rows = pd.read_parquet(part, columns=["prompt_index"])
        counts = rows.groupby("prompt_index").size() if len(rows) else pd.Series(dtype=int)
        if len(rows) and (counts == num_samples).all():
            done.update(int(i) for i in counts.index)
        else:
            logger.warning("removing incomplete part %s; its prompts are sampled again", part)
            part.unlink()
    return done


def _sample_into_parts(
    cfg: RunConfig,
    pending: pd.DataFrame,
    out: Path,
    prompts_per_batch: int,
    progress: bool,
    total: int,
) -> dict[str, Any]:
    """Fan the pending prompts out over an actor pool; write each batch's samples as a part.

    Returns:
        ``samples`` and ``accepted`` written, and the ``seconds`` it took.
    """
    import ray.data
    from tqdm.auto import tqdm

    res = cfg.resources
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # One block per batch of prompts: the actors share the work, and each call's samples
    # arrive (and are written) on their own.
    k = prompts_per_batch
    blocks = [pending.iloc[i : i + k] for i in range(0, len(pending), k)]
    dataset = ray.data.from_pandas(blocks).map_batches(
        BatchSampler,
        fn_constructor_kwargs={
            "lm": cfg.lm,
            "selection": cfg.rsft,
            "seed": cfg.seed,
            "num_threads": torch_threads(res.cpus_per_rollout_actor),
            "device": "cuda" if res.gpus_per_rollout_actor > 0 else "cpu",
        },
        batch_size=prompts_per_batch,
        batch_format="pandas",
        # two calls queued per actor: the next batch is there when one ends (no idle gap),
        # and the last batches still go to whichever actor is free (no idle tail)
        compute=ray.data.ActorPoolStrategy(
            size=res.num_rollout_actors, max_tasks_in_flight_per_actor=2
        ),
        num_cpus=res.cpus_per_rollout_actor,
        num_gpus=res.gpus_per_rollout_actor or None,
        resources=res.rollout_actor_resources or None,
    )
    (out / PARTS).mkdir(exist_ok=True)
    bar = tqdm(total=total, initial=total - len(pending), unit="prompt", disable=not progress)
    rate: dict[str, Any] = {"samples": 0, "accepted": 0, "seconds": 0.0, "first_s": None}
    start = time.perf_counter()
    # Arrow blocks straight to parquet: the driver shares the cores with the actors, so it
    # does as little per batch as it can (no pandas, no JSON).
    for samples in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        if not samples.num_rows:
            continue
        accepted = int(pc.sum(samples["accepted"]).as_py() or 0)
        if rate["first_s"] is None:  # actor start-up (model load) ends with the first batch
            rate["first_s"] = time.perf_counter() - start
            first_batch = (samples.num_rows, accepted)
        first = int(pc.min(samples["prompt_index"]).as_py())
        _write_parquet(samples, out / PARTS / f"part-{first:08d}-{uuid.uuid4().hex[:8]}.parquet")
        bar.update(len(pc.unique(samples["prompt_index"])))
        rate["samples"] += samples.num_rows
        rate["accepted"] += accepted
    rate["seconds"] = time.perf_counter() - start
    bar.close()
    if rate["first_s"] is not None and rate["seconds"] > rate["first_s"]:
        steady = rate["seconds"] - rate["first_s"]
        rate["steady_samples_per_s"] = (rate["samples"] - first_batch[0]) / steady
        rate["steady_accepted_per_s"] = (rate["accepted"] - first_batch[1]) / steady
    return rate


def _finish(
    cfg: RunConfig,
    out: Path,
    fmt: str,
    wall_s: float,
    rate: dict[str, Any],
    info: dict[str, Any],
) -> dict[str, Any]:
    """Write the accepted set and ``summary.json`` from every part."""
    parts = sorted((out / PARTS).glob("part-*.parquet"))
    frames = [pd.read_parquet(p) for p in parts]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SAMPLE_COLUMNS)
    # one row per (prompt, sample) even if a retried block ever arrived twice
    rows = rows.drop_duplicates(["prompt_index", "sample"]).sort_values(["prompt_index", "sample"])
    rows = rows.reset_index(drop=True)
    columns = ["prompt", "completion", "reward", "logprob", "policy_version", "prompt_index"]
    accepted = rows[rows["accepted"].astype(bool)][columns].reset_index(drop=True)
    target = out / f"accepted.{fmt}"
    if fmt == "jsonl":
        atomic_write_text(target, accepted.to_json(orient="records", lines=True))
    else:
        _write_parquet(pa.Table.from_pandas(accepted, preserve_index=False), target)
    seconds = max(float(rate["seconds"]), 1e-9)
    summary = {
        "output": str(target),
        "prompts": int(rows["prompt_index"].nunique()),
        "samples": len(rows),
        "accepted": len(accepted),
        "accept_rate": len(accepted) / max(len(rows), 1),
        "reward_mean_all": float(rows["reward"].mean()) if len(rows) else None,
        "reward_mean_accepted": float(accepted["reward"].mean()) if len(accepted) else None,
        "select": cfg.rsft.select,
        "num_samples": cfg.lm.num_samples,
        "actors": cfg.resources.num_rollout_actors,
        "wall_s": round(wall_s, 2),
        "sampled_this_run": int(rate["samples"]),
        "sample_s": round(float(rate["seconds"]), 2),
        "samples_per_s": rate["samples"] / seconds if rate["samples"] else 0.0,
        "accepted_per_s": rate["accepted"] / seconds if rate["samples"] else 0.0,
        # after the first batch arrived: without the actors' start-up (model load)
        "first_batch_s": rate.get("first_s"),
        "steady_samples_per_s": rate.get("steady_samples_per_s"),
        "steady_accepted_per_s": rate.get("steady_accepted_per_s"),
        **{k: v for k, v in info.items() if k.startswith("data/")},
    }
    atomic_write_json(out / "summary.json", summary)
    if not len(accepted):
        logger.warning("no sample was accepted (rsft.select=%s)", cfg.rsft.select)
    return summary


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` atomically (never half a file)."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def command(args: argparse.Namespace) -> int:
    from rlft_ray.apps.sample import run_sampling

    cfg = build_config(args.config, args.overrides)
    summary = run_sampling(
        cfg,
        args.output_dir,
        resume=args.resume,
        fmt=args.format,
        prompts_per_batch=args.prompts_per_batch,
        progress=not args.no_progress,
        address=args.address,
    )
    print(json.dumps(summary, indent=2))
    return 0
