"""LoRA against full fine-tuning: weight-sync bytes, learner memory, and the quickstart's gain.

Three measurements, each printed as JSON lines with full and LoRA side by side:

1. ``sync``: GRPO on the arithmetic prompts with a tiny GPT-2 of 4 layers / hidden 256
   (built locally), same settings and seed, full vs ``lm.lora.r=16``: bytes published per
   weight sync (``perf/weight_sync_mb``) and the sync's share of an iteration
   (``perf/weight_sync_frac``), medians over the run's iterations.
2. ``memory``: peak resident memory of a learner process (the same model; GRPO with the KL
   reference kept, 5 updates on a real sampled batch), each in a fresh process.
3. ``quickstart`` (``--quickstart``): the README's quickstart with LoRA; the target is a
   held-out exact-match gain of >= 20 points over the SFT base.

Usage:
    python benchmarks/bench_lora.py [--iterations 30] [--quickstart]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, emit, run_cli, train_cli

LORA = ["lm.lora.r=16", "lm.lora.alpha=32"]
MODES = {"full": [], "lora": LORA}


def build_model(directory: Path) -> Path:
    from rlft_ray.lm.tiny import make_tiny_model

    return make_tiny_model(directory / "tiny256", n_layer=4, hidden=256, n_head=4, max_positions=64)


def sync_run(model: Path, mode: str, iterations: int) -> dict[str, float]:
    summary = train_cli(
        "examples/arithmetic_grpo.yaml",
        [
            f"lm.model={model}",
            "lm.reward_fn=envs.arithmetic:digit_fraction",
            f"total_iterations={iterations}",
            f"checkpoint_every={iterations}",
            "seed=0",
            *MODES[mode],
        ],
    )
    rows = [json.loads(x) for x in (Path(summary["output_dir"]) / "metrics.jsonl").open()][1:]
    med = {
        k: statistics.median(r[k] for r in rows)
        for k in (
            "perf/weight_sync_mb",
            "perf/weight_sync_s",
            "perf/weight_sync_frac",
            "perf/iteration_s",
        )
    }
    return med


ARRAYS = (
    "prompt_ids",
    "prompt_mask",
    "response_ids",
    "response_mask",
    "logprobs",
    "rewards",
    "group_ids",
)


def make_batch(model: Path, path: Path) -> None:
    """A real sampled GRPO batch (16 prompts x 8), saved as arrays for the memory runs."""
    import numpy as np

    from rlft_ray.config import build_config
    from rlft_ray.rollout.generation import GenerationActor
    from rlft_ray.types import Prompt

    cfg = build_config(ROOT / "examples" / "arithmetic_grpo.yaml", [f"lm.model={model}"])
    actor = GenerationActor(cfg.lm, seed=0)
    texts = [f"{a}+{b}=" for a, b in zip(range(10, 26), range(40, 56))]
    batch = actor.generate([Prompt(t, actor.tokenizer(t)["input_ids"], {}) for t in texts])
    batch.rewards = np.random.default_rng(0).random(len(batch)).astype(np.float32)
    np.savez(path, pad=batch.pad_token_id, **{k: getattr(batch, k) for k in ARRAYS})


def learner_memory(model: str, mode: str, batch_file: str) -> None:
    """In a fresh process: a GRPO learner (KL reference kept) takes 5 updates on the saved
    batch; prints the process's peak RSS and the part the learner added (MB)."""
    import numpy as np
    import torch

    from rlft_ray.config import build_config
    from rlft_ray.learners.base import LearnerContext
    from rlft_ray.learners.registry import get_learner_cls
    from rlft_ray.types import GenerationBatch

    torch.manual_seed(0)
    cfg = build_config(
        ROOT / "examples" / "arithmetic_grpo.yaml",
        [f"lm.model={model}", "grpo.kl_coef=0.04", *MODES[mode]],
    )
    with np.load(batch_file) as data:
        arrays = {k: data[k] for k in ARRAYS}
        pad = int(data["pad"])
    n = len(arrays["rewards"])
    batch = GenerationBatch(
        **arrays,
        prompts=[""] * n,
        completions=[""] * n,
        metadata=[{}] * n,
        policy_version=0,
        group_size=8,
        pad_token_id=pad,
    )
    import peft  # noqa: F401  (imported before the baseline: both modes pay for the imports)
    from transformers import GPT2LMHeadModel  # noqa: F401

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports only
    learner = get_learner_cls("grpo")(cfg, None, LearnerContext(0, 1))
    for _ in range(5):
        learner.update(batch, progress=0.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    core = learner.core
    state = sum(t.numel() * t.element_size() for t in core.model.state_dict().values())
    if core.reference is not None:  # a second model without LoRA, adapters with it
        state += sum(t.numel() * t.element_size() for t in core.reference.state_dict().values())
    trainable = core.trainable()
    state += 3 * sum(p.numel() * p.element_size() for p in trainable)  # grads + Adam m, v
    print(
        json.dumps(
            {
                "peak_rss_mb": round(peak, 1),
                "learner_rss_mb": round(peak - before, 1),
                "weights_grads_optimizer_mb": round(state / 1e6, 1),
                "trainable_params": sum(p.numel() for p in trainable),
            }
        )
    )


def memory_run(model: Path, mode: str, batch_file: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--learner-memory", str(model), mode, str(batch_file)],
        capture_output=True,
        text=True,
        cwd=ROOT / "benchmarks",
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quickstart_run() -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix="rlft_bench_")) / "q"
    wall = run_cli("quickstart", "--output-dir", str(out), *LORA, "grpo.optim.lr=2e-3")
    s = json.loads((out / "summary.json").read_text())
    return {
        "accuracy_before": round(s["accuracy_before"], 3),
        "accuracy_after": round(s["accuracy_after"], 3),
        "gain_points": round(100 * s["accuracy_gain"], 1),
        "rl_s": s["rl_s"],
        "command_wall_s": round(wall, 1),
        "target_gain_points": 20,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--quickstart", action="store_true", help="also run the quickstart with LoRA")
    p.add_argument("--learner-memory", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.learner_memory:
        learner_memory(*args.learner_memory)
        return
    model = build_model(Path(tempfile.mkdtemp(prefix="rlft_bench_lora_")))
    sync = {mode: sync_run(model, mode, args.iterations) for mode in MODES}
    emit(
        {
            "benchmark": "lora_sync",
            "model": "gpt2 4x256",
            **{f"{m}_{k.split('/')[-1]}": round(v, 4) for m in MODES for k, v in sync[m].items()},
            "bytes_ratio": round(
                sync["full"]["perf/weight_sync_mb"] / sync["lora"]["perf/weight_sync_mb"], 1
            ),
        }
    )
    batch_file = model.parent / "batch.npz"
    make_batch(model, batch_file)
    mem = {mode: memory_run(model, mode, batch_file) for mode in MODES}
    emit(
        {
            "benchmark": "lora_memory",
            "model": "gpt2 4x256",
            **{f"{m}_{k}": v for m in MODES for k, v in mem[m].items()},
        }
    )
    if args.quickstart:
        emit({"benchmark": "lora_quickstart", **quickstart_run()})


if __name__ == "__main__":
    main()
