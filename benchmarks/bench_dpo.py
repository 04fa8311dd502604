"""Our DPO learner against TRL's ``DPOTrainer``, side by side on this machine.

Both train the same locally built GPT-2 (4 layers, hidden 128, char tokenizer) on the same
512 arithmetic pairs (chosen: the right sum; rejected: a wrong one), batch 32, sigmoid DPO
with beta 0.1, lr 5e-4 decaying linearly to 0, AdamW, gradient clipping 1.0, no dropout,
for the same number of optimizer steps, with one torch thread each (our learner holds one
CPU). TRL runs with its defaults otherwise (reference log-probs on the fly); ours
precomputes them once on an actor. Printed as JSON lines:

* pairs/s of the training loop (ours: pairs over the loop's seconds; TRL: its
  ``train_runtime``) and seconds from command start to exit, with their ratios
  (target: >= 2x TRL's pairs/s);
* the DPO loss of each trained model on all 512 pairs against the initial model, after
  the same number of steps (target: within 2 % of TRL's);
* with ``--ddp``, our loss curve with 2 DDP learners next to 1 learner's, on the same global
  batch size (the same pairs in a different split: the curves agree within noise; the
  exact equality of one step's gradients is a test).

Needs the ``bench`` extra (``pip install -e ".[bench]"``).

Usage: python benchmarks/bench_dpo.py [--epochs 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, TRL_AS_OURS, emit, train_cli

LR, BETA, BATCH, PAIRS = 5e-4, 0.1, 32, 512


def make_inputs(folder: Path, seed: int) -> tuple[Path, Path]:
    """The tiny GPT-2 and the 512 pairs."""
    from rlft_ray.lm.tiny import make_tiny_model

    model = make_tiny_model(
        folder / "gpt2", n_layer=4, hidden=128, n_head=4, max_positions=64, seed=seed
    )
    rng = random.Random(seed)
    rows = [json.loads(x) for x in (ROOT / "data" / "arith_train.jsonl").read_text().splitlines()]
    pairs = folder / "pairs.jsonl"
    with open(pairs, "w") as f:
        for r in rows[:PAIRS]:
            wrong = int(r["answer"]) + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
            f.write(
                json.dumps({"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(wrong)})
                + "\n"
            )
    return model, pairs


def trl_worker(model: str, pairs: str, out: str, epochs: int, seed: int) -> None:
    """Run TRL's DPOTrainer (in a fresh process, so its start-up is counted) and save the model."""
    start = time.perf_counter()
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model)
    args = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        beta=BETA,
        num_train_epochs=epochs,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,
        **TRL_AS_OURS,  # float32, no gradient checkpointing: TRL's defaults are neither
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        args=args,
        train_dataset=load_dataset("json", data_files=pairs, split="train"),
        processing_class=tok,
    )
    result = trainer.train()
    trainer.save_model(out)
    tok.save_pretrained(out)
    print(
        json.dumps(
            {
                "train_runtime": result.metrics["train_runtime"],
                "steps": result.global_step,
                "process_s": time.perf_counter() - start,
            }
        )
    )


def dpo_loss_on_all(policy_dir: Path, reference: Path, pairs: Path) -> float:
    """Mean sigmoid-DPO loss of ``policy_dir`` against ``reference`` on every pair."""
    import torch

    from rlft_ray.algorithms import dpo_losses
    from rlft_ray.config import build_config
    from rlft_ray.lm.loading import load_model_and_tokenizer
    from rlft_ray.lm.pairs import load_pairs, pair_batch, pair_tensors
    from rlft_ray.lm.policy import PolicyWithValueHead, pair_logps

    lm = build_config(overrides=["lm.max_prompt_tokens=32", "lm.max_completion_tokens=16"]).lm
    pol, tok = load_model_and_tokenizer(policy_dir)
    ref, _ = load_model_and_tokenizer(reference)
    table, _ = load_pairs(pairs, tok, lm)
    t = pair_tensors(pair_batch(table, tok.pad_token_id), torch.device("cpu"))
    with torch.no_grad():
        pc, pr, _ = pair_logps(PolicyWithValueHead(pol.float().eval()), t)
        rc, rr, _ = pair_logps(PolicyWithValueHead(ref.float().eval()), t)
        losses, _, _ = dpo_losses(pc, pr, rc, rr, BETA)
    return float(losses.mean())


def _ours_overrides(model: Path, pairs: Path, args: argparse.Namespace) -> list[str]:
    return [
        f"model={model}",
        f"lm.pairs={pairs}",
        "lm.eval_pairs=null",
        "lm.eval_prompts=null",
        "lm.max_prompt_tokens=32",
        "lm.max_completion_tokens=16",
        f"dpo.beta={BETA}",
        f"dpo.optim.lr={LR}",
        "dpo.sft_coef=0.0",
        "dpo.optim.lr_schedule=linear",
        "dpo.optim.warmup_fraction=0.0",
        f"dpo.batch_size={BATCH}",
        f"dpo.micro_batch_size={BATCH}",
        f"dpo.num_epochs={args.epochs}",
        "eval_every=null",
        f"checkpoint_every={10**6}",
        f"seed={args.seed}",
    ]


def ddp_curves(model: Path, pairs: Path, folder: Path, args: argparse.Namespace) -> None:
    """Our loss curve with 2 DDP learners next to 1 learner's, same global batch."""
    curves = {}
    for n in (1, 2):
        # the reference pass runs on rollout actors, which must split evenly over the ranks
        extra = [
            f"resources.num_learners={n}",
            f"resources.num_rollout_actors={n}",
            "resources.cpus_per_learner=1.0",
        ]
        train_cli(
            "examples/arithmetic_dpo.yaml",
            [*_ours_overrides(model, pairs, args), *extra],
            folder / f"ddp{n}",
        )
        rows = [
            json.loads(x) for x in (folder / f"ddp{n}" / "metrics.jsonl").read_text().splitlines()
        ]
        curves[n] = [round(r["loss/dpo"], 4) for r in rows]
    gaps = [abs(a - b) for a, b in zip(curves[1], curves[2])]
    emit(
        {
            "benchmark": "dpo_ddp",
            "loss_1_learner": curves[1],
            "loss_2_learners": curves[2],
            "mean_abs_gap": round(sum(gaps) / len(gaps), 4),
            "final": {"1": curves[1][-1], "2": curves[2][-1]},
        }
    )


def main() -> None:
    os.environ.setdefault("RAY_ADDRESS", "local")
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ddp", action="store_true", help="also compare 2 DDP learners with 1")
    p.add_argument(
        "--trl-worker", nargs=3, metavar=("MODEL", "PAIRS", "OUT"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.trl_worker:
        trl_worker(*args.trl_worker, epochs=args.epochs, seed=args.seed)
        return
    folder = Path(tempfile.mkdtemp(prefix="rlft_dpo_bench_"))
    model, pairs = make_inputs(folder, args.seed)

    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--epochs",
            str(args.epochs),
            "--seed",
            str(args.seed),
            "--trl-worker",
            str(model),
            str(pairs),
            str(folder / "trl"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    trl_wall = time.perf_counter() - start
    trl = json.loads(proc.stdout.strip().splitlines()[-1])

    ours = train_cli(
        "examples/arithmetic_dpo.yaml", _ours_overrides(model, pairs, args), folder / "ours"
    )
    rows = [json.loads(x) for x in (folder / "ours" / "metrics.jsonl").read_text().splitlines()]
    ours_loop_s = rows[-1]["time/wall_s"]
    pairs_done = BATCH * ours["iterations"]
    trl_loss = dpo_loss_on_all(folder / "trl", model, pairs)
    ours_loss = dpo_loss_on_all(folder / "ours" / "checkpoint_last" / "policy", model, pairs)
    ours_rate, trl_rate = pairs_done / ours_loop_s, BATCH * trl["steps"] / trl["train_runtime"]
    emit(
        {
            "benchmark": "dpo_vs_trl",
            "steps": {"ours": ours["iterations"], "trl": trl["steps"]},
            "pairs_per_s": {"ours": round(ours_rate, 1), "trl": round(trl_rate, 1)},
            "pairs_per_s_ratio": round(ours_rate / trl_rate, 2),
            "command_s": {"ours": ours["command_wall_s"], "trl": round(trl_wall, 2)},
            "command_s_ratio_trl_over_ours": round(trl_wall / ours["command_wall_s"], 2),
            "dpo_loss_after": {"ours": round(ours_loss, 4), "trl": round(trl_loss, 4)},
            "loss_rel_diff": round(abs(ours_loss - trl_loss) / trl_loss, 4),
            "targets": {"pairs_per_s_ratio": 2.0, "loss_rel_diff": 0.02},
            "met": ours_rate >= 2 * trl_rate and abs(ours_loss - trl_loss) <= 0.02 * trl_loss,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    )
    if args.ddp:
        ddp_curves(model, pairs, folder, args)


if __name__ == "__main__":
    main()
