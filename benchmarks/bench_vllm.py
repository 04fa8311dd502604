"""Generation tokens/s of the two generation backends, ``lm.backend: hf`` vs ``vllm``.

Both run as :class:`~rlft_ray.rollout.generation.GenerationActor` s in this process on
the same model, prompts and sampling (16 prompts x 8 samples, up to 128 new tokens,
temperature 1), alternating runs so that load from elsewhere on the machine hits both
alike. Per dtype it also prints the seconds of one weight sync (``set_weights`` of the
full state dict) and the largest gap between the log-probs vLLM records and an HF
forward of the same weights (the learner's). One JSON line per measurement::

    python benchmarks/bench_vllm.py                                  # tiny Llama, fp32 and bf16
    python benchmarks/bench_vllm.py --model /path/to/SmolLM2-135M-Instruct --threads 2

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="save_pretrained dir (default: tiny Llama)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4, help="runs per backend, alternating")
    parser.add_argument("--threads", type=int, default=2, help="CPUs of each actor")
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
        for dtype in args.dtypes:
            run(model_dir, name, dtype, args)


if __name__ == "__main__":
    main()
