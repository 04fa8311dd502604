"""Generation tokens/s of the two generation backends, ``lm.backend: hf`` vs ``vllm``.

Both run as :class:`~rlft_ray.rollout.generation.GenerationActor` s in this process on
the same model, prompts and sampling (16 prompts x 8 samples, up to 128 new tokens,
temperature 1), alternating runs so that load from elsewhere on the machine hits both
alike. Per dtype it also prints the seconds of one weight sync (``set_weights`` of the
full state dict) and the largest gap between the log-probs vLLM records and an HF
forward of the same weights (the learner's). One JSON line per measurement::

    python benchmarks/bench_vllm.py                                  # tiny Llama, fp32 and bf16
    python benchmarks/bench_vllm.py --model /path/to/SmolLM2-135M-Instruct --threads 2
    python benchmarks/bench_vllm.py --model DIR --only sync          # where a weight sync goes
    python benchmarks/bench_vllm.py --model DIR --only lora --lora-r 16  # LoRARequest vs merge
    python benchmarks/bench_vllm.py --model DIR --only grpo --grpo-iterations 3  # iteration time
    python benchmarks/bench_vllm.py --only tis --seeds 0 1 2   # bf16 engine + TIS vs fp32

``--only sync`` splits one weight sync of the vLLM actor into the learner's write to the
shared-memory slot, the actor's read of it, and the engine's reload (wall and process
CPU seconds), of which the CPU backend's oneDNN weight packing; it alternates vLLM's
layer-by-layer ``reload_weights`` (``"path": "layerwise"``, the old path) with the
direct write into the engine's parameters (``"direct"``, what the actor does). ``--only lora`` compares the two ways a LoRA run could
feed vLLM: adapters as a ``LoRARequest`` (what ``lm.backend: vllm`` does) against merging
them into the base weights and reloading those (sync seconds, generation tokens/s; the
two engines run one after the other, an engine per process at a time). ``--only grpo``
runs ``examples/chat_grpo.yaml`` on ``--model`` for a few iterations per backend and
dtype, alternating, and prints the median ``perf/iteration_s`` after the first, with its
sampling, update and weight-sync parts (the sync: the learner's publish and the actor's
load, for vLLM the engine's reload) and what the update's time follows: the share of
groups scored alike (skipped: no gradient) and the mean answer length.

Needs vLLM (README "vLLM backend"). ``--model`` takes any ``save_pretrained``
directory whose head size vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rlft_ray.config import LMConfig
from rlft_ray.lm.policy import PolicyWithValueHead, response_forward
from rlft_ray.lm.tiny import make_tiny_model
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.types import GenerationBatch, Prompt

TEXTS = [
    "12+34=",
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Once upon a time",
    "57+8=",
    "List three colors:",
    "The quick brown fox",
    "Q: What is 2+2?\nA:",
    "import numpy as np\n",
    "Dear friend,",
    "In 1969, the first",
    "99+99=",
    "Translate to French: cat",
    "The best way to learn is",
    "Summary:",
]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def logprob_gap(
    actor: GenerationActor, model_dir: str, dtype: str, batch: GenerationBatch
) -> float:
    """Largest |vLLM log-prob - HF log-prob| over the batch's real tokens (HF in ``dtype``)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        logp = response_forward(
            PolicyWithValueHead(hf),
            torch.as_tensor(batch.prompt_ids),
            torch.as_tensor(batch.prompt_mask),
            torch.as_tensor(batch.response_ids),
            torch.as_tensor(batch.response_mask),
            temperature=actor.lm.temperature,
            entropy=False,
        ).logprobs.float()
    gap = (logp.numpy() - batch.logprobs) * batch.response_mask
    return float(np.abs(gap).max())


def run(model_dir: str, name: str, dtype: str, args: argparse.Namespace) -> None:
    lm = LMConfig(
        model=model_dir,
        dtype=dtype,
        temperature=1.0,
        top_p=1.0,
        num_samples=args.samples,
        max_new_tokens=args.new_tokens,
        max_prompt_tokens=64,
        generation_batch_size=args.prompts * args.samples,
    )
    actors = {
        backend: GenerationActor(
            dataclasses.replace(lm, backend=backend), seed=0, num_threads=args.threads
        )
        for backend in ("hf", "vllm")
    }
    tokenizer = actors["hf"].tokenizer
    texts = (TEXTS * (args.prompts // len(TEXTS) + 1))[: args.prompts]
    prompts = [Prompt(t, tokenizer(t)["input_ids"]) for t in texts]
    state = {k: v.detach().clone() for k, v in actors["hf"].model.state_dict().items()}
    for backend, actor in actors.items():  # publish once, as the learner does, and time it
        syncs = []
        for version in range(3):
            start = time.perf_counter()
            actor.set_weights(state, version)
            syncs.append(time.perf_counter() - start)
        emit(
            {
                "model": name,
                "dtype": dtype,
                "backend": backend,
                "weight_sync_s": round(statistics.median(syncs), 4),
                "params_m": round(sum(v.numel() for v in state.values()) / 1e6, 2),
            }
        )
    actors["vllm"].generate(prompts[:2], num_samples=2, max_new_tokens=4)  # warm-up
    actors["hf"].generate(prompts[:2], num_samples=2, max_new_tokens=4)
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    last: dict[str, GenerationBatch] = {}
    for rep in range(args.repeats):
        for backend in ("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf"):
            torch.manual_seed(rep)
            batch = actors[backend].generate(prompts)
            tokens = int(batch.response_mask.sum())
            rates[backend].append(tokens / batch.generate_s)
            last[backend] = batch
            emit(
                {
                    "model": name,
                    "dtype": dtype,
                    "backend": backend,
                    "repeat": rep,
                    "tokens": tokens,
                    "seconds": round(batch.generate_s, 3),
                    "tokens_per_s": round(tokens / batch.generate_s, 1),
                }
            )
    hf_rate, vllm_rate = statistics.median(rates["hf"]), statistics.median(rates["vllm"])
    emit(
        {
            "model": name,
            "dtype": dtype,
            "summary": True,
            "prompts": args.prompts,
            "samples": args.samples,
            "max_new_tokens": args.new_tokens,
            "threads": args.threads,
            "hf_tokens_per_s": round(hf_rate, 1),
            "vllm_tokens_per_s": round(vllm_rate, 1),
            "speedup": round(vllm_rate / hf_rate, 2),
            "vllm_logprob_gap": logprob_gap(actors["vllm"], model_dir, dtype, last["vllm"]),
        }
    )
    actors["vllm"].engine.close()


def sync_profile(model_dir: str, name: str, dtype: str, args: argparse.Namespace) -> None:
    """One vLLM actor's weight sync, split: slot write (learner), slot read, engine reload
    (wall and process CPU seconds; of which oneDNN packing: ``create_onednn_mm`` timed
    around each call), alternating vLLM's layer-by-layer reload and the direct one."""
    from vllm import _custom_ops as ops

    from rlft_ray.rollout.shared_weights import SharedWeights

    packing = [0.0]
    create = ops.create_onednn_mm

    def timed_create(*a, **k):  # the CPU backend packs each linear weight for oneDNN
        start = time.perf_counter()
        try:
            return create(*a, **k)
        finally:
            packing[0] += time.perf_counter() - start

    ops.create_onednn_mm = timed_create
    lm = LMConfig(model=model_dir, dtype=dtype, backend="vllm", max_prompt_tokens=64)
    actor = GenerationActor(lm, seed=0, num_threads=args.threads)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}  # an fp32 learner's
    del hf
    shared = SharedWeights(max_bytes=16 * 2**30)  # the slot file, whatever the model's size
    reload = [0.0, 0.0]  # the engine's reload: wall and process CPU seconds
    engine_load = actor.engine.load_weights

    def timed_load(weights):  # what set_weights spends in the engine (cast included)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return engine_load(weights)
        finally:
            reload[:] = [time.perf_counter() - start, time.process_time() - cpu]

    actor.engine.load_weights = timed_load
    try:
        for version in range(2 * args.repeats):  # layerwise and direct reloads, alternating
            start = time.perf_counter()
            slot = shared.write(state, version)
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            slot.read()
            read_s = time.perf_counter() - start
            packing[0] = 0.0
            actor.engine.direct_reload = version % 2 == 1
            start = time.perf_counter()
            actor.set_weights(slot, version)  # reads the slot again, then reloads
            total_s = time.perf_counter() - start
            emit(
                {
                    "model": name,
                    "dtype": dtype,
                    "bench": "weight_sync",
                    "path": actor.engine.last_reload,
                    "repeat": version // 2,
                    "slot_write_s": round(write_s, 4),
                    "slot_read_s": round(read_s, 4),
                    "set_weights_s": round(total_s, 4),
                    "reload_s": round(reload[0], 4),
                    "reload_cpu_s": round(reload[1], 4),
                    "onednn_pack_s": round(packing[0], 4),
                    "load_avg_1m": round(os.getloadavg()[0], 1),
                    "mb": round(sum(v.numel() * 4 for v in state.values()) / 1e6, 1),
                }
            )
    finally:
        shared.close()
        actor.close()
        ops.create_onednn_mm = create


def lora_vs_merge(model_dir: str, name: str, dtype: str, args: argparse.Namespace) -> None:
    """LoRA adapters served as a ``LoRARequest`` vs merged into the base and reloaded."""
    from transformers import AutoModelForCausalLM

    from rlft_ray.config import LoRAConfig
    from rlft_ray.lm.lora import adapter_state, adapter_tensors, apply_lora

    lora = LoRAConfig(r=args.lora_r, alpha=2.0 * args.lora_r)
    lm = LMConfig(
        model=model_dir,
        dtype=dtype,
        backend="vllm",
        temperature=1.0,
        num_samples=args.samples,
        max_new_tokens=args.new_tokens,
        max_prompt_tokens=64,
        generation_batch_size=args.prompts * args.samples,
    )
    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), lora).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter_tensors(peft_model).values():
            param.normal_(0.0, 0.02, generator=generator)
    adapters = adapter_state(peft_model)
    merged = {
        k: v.detach().clone()
        for k, v in peft_model.merge_and_unload().state_dict().items()  # W + (alpha/r) B A
    }
    for mode in ("lora_request", "merged"):
        actor = GenerationActor(
            dataclasses.replace(lm, lora=lora if mode == "lora_request" else LoRAConfig()),
            seed=0,
            num_threads=args.threads,
        )
        try:
            texts = (TEXTS * (args.prompts // len(TEXTS) + 1))[: args.prompts]
            prompts = [Prompt(t, actor.tokenizer(t)["input_ids"]) for t in texts]
            syncs = []
            for version in range(3):
                start = time.perf_counter()
                actor.set_weights(adapters if mode == "lora_request" else merged, version)
                syncs.append(time.perf_counter() - start)
            actor.generate(prompts[:2], num_samples=2, max_new_tokens=4)  # warm-up
            rates = []
            for rep in range(args.repeats):
                torch.manual_seed(rep)
                batch = actor.generate(prompts)
                rates.append(int(batch.response_mask.sum()) / batch.generate_s)
            emit(
                {
                    "model": name,
                    "dtype": dtype,
                    "bench": "lora",
                    "mode": mode,
                    "lora_r": args.lora_r,
                    "weight_sync_s": round(statistics.median(syncs), 4),
                    "tokens_per_s": round(statistics.median(rates), 1),
                    "sync_mb": round(
                        sum(
                            v.numel() * 4
                            for v in (adapters if mode == "lora_request" else merged).values()
                        )
                        / 1e6,
                        2,
                    ),
                }
            )
        finally:
            actor.close()


def grpo_iterations(model: str, name: str, dtypes: list[str], args: argparse.Namespace) -> None:
    """Whole GRPO iterations of ``examples/chat_grpo.yaml`` per backend and dtype,
    alternating: the median ``perf/iteration_s`` (and its sampling and sync parts) after
    the first iteration (engine start, warm-up)."""
    import ray

    from rlft_ray.config import build_config
    from rlft_ray.run.driver import run_training
    from rlft_ray.run.metrics import read_metrics

    example = Path(__file__).resolve().parent.parent / "examples" / "chat_grpo.yaml"
    ray.init(address="local", num_cpus=2, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for dtype in dtypes:
                for backend in ("hf", "vllm") if dtype == dtypes[0] else ("vllm", "hf"):
                    cfg = build_config(
                        example,
                        [
                            f"lm.model={model}",
                            f"lm.dtype={dtype}",
                            f"lm.backend={backend}",
                            f"total_iterations={args.grpo_iterations}",
                            "eval_every=null",
                            "checkpoint_every=1000",
                        ],
                    )
                    out = Path(tmp) / f"{backend}-{dtype}"
                    run_training(cfg, out, progress=False, track=False)
                    rows = read_metrics(out)[1:]
                    med = {
                        k: round(statistics.median(r[f"perf/{k}"] for r in rows), 3)
                        for k in (
                            "iteration_s",
                            "sample_s",
                            "update_s",
                            "weight_sync_s",  # publish + the actor's load (reload)
                            "weight_publish_s",
                            "weight_load_s",
                        )
                    }
                    # What the update trains on follows the samples, which differ between
                    # backends: groups whose rewards are all equal carry no gradient (their
                    # rows are skipped), and longer answers cost more.
                    med.update(
                        {
                            k: round(statistics.median(r[f"rollout/{k}"] for r in rows), 3)
                            for k in ("flat_group_frac", "response_len_mean")
                        }
                    )
                    # the engine's recorded log-probs against the learner's, every iteration
                    # that trained a row (None: every group scored alike, nothing compared)
                    gaps = {
                        k: [
                            None if r.get(f"rollout/{k}") is None else round(r[f"rollout/{k}"], 6)
                            for r in read_metrics(out)
                        ]
                        for k in ("logprob_gap", "logprob_gap_max")
                        if backend == "vllm"
                    }
                    emit(
                        {
                            "model": name,
                            "dtype": dtype,
                            "bench": "grpo_iteration",
                            "backend": backend,
                            "iterations": len(rows),
                            **med,
                            **gaps,
                        }
                    )
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="save_pretrained dir (default: tiny Llama)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4, help="runs per backend, alternating")
    parser.add_argument("--threads", type=int, default=2, help="CPUs of each actor")
    parser.add_argument(
        "--only",
        choices=["generate", "sync", "lora", "grpo", "tis"],
        default=None,
        help="one measurement (default: generate tokens/s and the short sync figure)",
    )
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--grpo-iterations", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--only tis")
    parser.add_argument("--tis-iterations", type=int, default=40, help="--only tis")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # stdout stays JSON lines
    from rlft_ray.lm import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            # head size 32 (vLLM's CPU attention has no kernel for the default 16)
            model_dir = str(
                make_tiny_model(Path(tmp) / "llama", arch="llama", n_head=2, max_positions=256)
            )
            name = "tiny-llama"
        else:
            model_dir, name = args.model, Path(args.model).name
        if args.only == "tis":  # bf16 engine + TIS vs fp32 (benchmarks/bench_vllm_tis.py)
            from bench_vllm_tis import tis_seeds

            tis_seeds(args)
            return
        if args.only == "grpo":
            grpo_iterations(args.model or model_dir, name, args.dtypes, args)
            return
        measure = {"sync": sync_profile, "lora": lora_vs_merge}.get(args.only, run)
        for dtype in args.dtypes:
            measure(model_dir, name, dtype, args)


if __name__ == "__main__":
    main()
