"""KTO / SimPO / ORPO against DPO on the same pairs, and ILQL against RSFT and DPO on the
same sampled set, all from one SFT base of the quickstart (JSON lines).

1. Base: ``rlft-ray quickstart --output-dir <tmp>/q total_iterations=1`` (its SFT base
   ``sft_base``; the one RL iteration after it does not touch the base), or ``--base`` /
   ``--data`` of an existing one.
2. Losses against TRL (needs the ``bench`` extra; skipped without trl): SimPO against
   ``CPOTrainer.cpo_loss(loss_type="simpo")``, ORPO against ``ORPOTrainer.odds_ratio_loss``
   and KTO against ``KTOTrainer._compute_loss`` on stub models returning the same
   log-probs: the largest relative difference per loss (target < 1 %).
3. Preference algorithms: ``rlft-ray make-arith-prefs`` labels the base's own samples with
   the verifier (pairs, and with ``--format kto`` the same completions unpaired); each of
   ``examples/arithmetic_{dpo,simpo,orpo,kto}.yaml`` trains from the base as shipped (DPO
   2 passes over the pairs, SimPO and ORPO 6, KTO 3 over the unpaired rows);
   ``rlft-ray eval`` scores the last checkpoint on the held-out prompts. Target: each
   >= +20 points within 3 minutes of training.
4. Value-based: ``rlft-ray sample examples/arithmetic_rsft.yaml rsft.select=all`` writes one
   reward-labelled set of the base's samples (the base's ``arith_train.jsonl``, 4000
   prompts, or its first ``--sample-prompts``, x 8). From it: ILQL
   (``examples/arithmetic_ilql.yaml``; evaluated with value-guided decoding at its
   ``lm.decode_beta``, at 8, and at 0: its behaviour-cloned LM alone), RSFT (supervised fine-tuning on
   the samples with reward 1: one round of expert iteration, ``rlft_ray.lm.sft``, one
   pass) and DPO (the best and the worst sample of each prompt).
   Target: ILQL + value-guided decoding >= +15 points.

Each row: gain in points over the base, training seconds (the loop's ``time/wall_s``),
command seconds, and whether the target was met; after the seeds, one ``median`` line per
algorithm (median gain and each seed's). Every model, the base included, is scored as the
quickstart scores its base (greedy, ``lm.max_new_tokens=8``, exact match).

Usage: python benchmarks/lm_preference_algos.py [--base runs/q/sft_base --data runs/q/data] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, emit, run_cli, train_cli
from bench_rlhf import heldout_accuracy

PAIR_ALGOS = ("dpo", "simpo", "orpo", "kto")
#: How the quickstart scores its SFT base (``examples/arithmetic_grpo.yaml``'s ``lm``): a
#: bare model directory under ``rlft-ray eval`` otherwise gets the built-in defaults.
QUICKSTART_EVAL = [
    "lm.eval_fn=envs.arithmetic:exact_match",
    "lm.max_prompt_tokens=16",
    "lm.prompt_overflow=drop",
    "lm.max_new_tokens=8",
]


def sft_info(base: str) -> dict[str, Any]:
    """The quickstart's record of how its SFT base was made (``sft_steps`` of 1000: a base
    whose supervised pass hit ``sft_max_seconds`` on a loaded machine is a weaker start)."""
    summary = Path(base).parent / "summary.json"
    if not summary.is_file():
        return {}
    info = json.loads(summary.read_text())
    return {k: info[k] for k in ("sft_steps", "sft_s", "accuracy_before") if k in info}


def medians(
    rows: list[dict[str, Any]], target: float, judged: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """One line per algorithm: the median gain over the seeds and each seed's gain; ``met``
    (median >= ``target``) for the algorithms in ``judged`` (default: all)."""
    import statistics

    by_algo: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_algo.setdefault(row["algo"], []).append(row)
    out = []
    for algo, runs in by_algo.items():
        gains = [r["gain_points"] for r in runs]
        line: dict[str, Any] = {
            "benchmark": "median",
            "algo": algo,
            "seeds": [r["seed"] for r in runs],
            "gain_points_per_seed": gains,
            "median_gain_points": statistics.median(gains),
        }
        if judged is None or algo in judged:
            line.update(target_points=target, met=statistics.median(gains) >= target)
        for key in ("bc_only_beta0_gain_points", "beta8_gain_points", "train_s"):
            if all(key in r for r in runs):
                line[f"median_{key}"] = statistics.median(r[key] for r in runs)
        out.append(line)
    return out


def trl_checks() -> dict[str, Any]:
    """Largest relative difference of each loss from TRL's on the same batch."""
    from types import SimpleNamespace

    import torch

    try:
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
        from trl.trainer.kto_trainer import KTOTrainer
    except ImportError:
        return {"benchmark": "trl_losses", "skipped": "trl is not installed"}
    from rlft_ray.algorithms import kto_losses, kto_reference_point, orpo_losses, simpo_losses

    g = torch.Generator().manual_seed(0)
    c, r = -torch.rand(64, generator=g) * 3, -torch.rand(64, generator=g) * 3
    cpu = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(
        alpha=0.0,
        beta=2.0,
        simpo_gamma=0.5,
        loss_type="simpo",
        label_smoothing=0.0,
        accelerator=cpu,
    )
    simpo_theirs = CPOTrainer.cpo_loss(stub, c, r)[0]
    simpo_ours = simpo_losses(c, r, 2.0, 0.5)[0]
    nll = torch.full_like(c, 0.3)
    orpo_theirs = (
        nll - ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.1, accelerator=cpu), c, r)[0]
    )
    orpo_ours = orpo_losses(c, r, nll, 0.1)[0]

    b, t = 16, 5
    tok, ref, kl, kl_ref = (-torch.rand(b, t, generator=g) for _ in range(4))
    labels = torch.rand(b, generator=g) > 0.5

    class Model(torch.nn.Module):
        is_gradient_checkpointing = False

        def __init__(self, logps: torch.Tensor, kl: torch.Tensor) -> None:
            super().__init__()
            self.logps, self.kl = logps, kl

        def forward(self, input_ids: torch.Tensor, **kw: Any) -> Any:
            lp = self.kl if input_ids is kl_ids else self.logps
            zeros = torch.zeros_like(lp)
            return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, aux_loss=None)

    ids, kl_ids = torch.zeros(b, t + 1, dtype=torch.long), torch.ones(b, t + 1, dtype=torch.long)
    ones = torch.ones(b, t + 1, dtype=torch.long)
    batch = {
        "input_ids": ids,
        "attention_mask": ones,
        "completion_mask": ones,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": ones,
        "KL_completion_mask": ones,
        "label": labels,
    }
    from collections import defaultdict

    kto = SimpleNamespace(
        model=Model(tok, kl),
        ref_model=Model(ref, kl_ref),
        accelerator=cpu,
        calculate_KL=True,
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        loss_type="kto",
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.33,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    kto._compute_kl_logps = lambda m, bt: KTOTrainer._compute_kl_logps(kto, m, bt)
    kto_theirs = float(KTOTrainer._compute_loss(kto, kto.model, batch, return_outputs=False))
    z0 = kto_reference_point(kl.sum(-1), kl_ref.sum(-1))
    kto_ours = float(kto_losses(tok.sum(-1), ref.sum(-1), labels, z0, 0.1, 1.0, 1.33)[0].mean())

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())

    diffs = {
        "simpo_max_rel_diff": rel(simpo_ours, simpo_theirs),
        "orpo_max_rel_diff": rel(orpo_ours, orpo_theirs),
        "kto_rel_diff": abs(kto_ours - kto_theirs) / abs(kto_theirs),
    }
    return {"benchmark": "trl_losses", **diffs, "met": all(v < 0.01 for v in diffs.values())}


def eval_curve(run_dir: Path) -> tuple[list[tuple[float, float]], float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    curve = [(r["time/wall_s"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return curve, round(rows[-1]["time/wall_s"], 1)


def trained(
    algo: str,
    config: str,
    overrides: list[str],
    data: Path,
    base_acc: float,
    target: float,
    extra_evals: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Train one example from the base; its held-out gain from ``rlft-ray eval``."""
    summary = train_cli(config, overrides)
    curve, train_s = eval_curve(Path(summary["output_dir"]))
    final = heldout_accuracy(summary["checkpoint_last"], data)
    gain = round(100 * (final - base_acc), 1)
    reached = [s for s, a in curve if a - base_acc >= target / 100 - 1e-9]
    row = {
        "algo": algo,
        "base_accuracy": round(base_acc, 4),
        "final_accuracy": round(final, 4),
        "gain_points": gain,
        "train_s": train_s,
        "first_s_at_target": round(reached[0], 1) if reached else None,
        "command_wall_s": summary["command_wall_s"],
        "met": gain >= target and train_s <= 180.0,
    }
    for name, extra in (extra_evals or {}).items():
        acc = eval_with(summary["checkpoint_last"], data, extra)
        row[f"{name}_gain_points"] = round(100 * (acc - base_acc), 1)
    return row


def eval_with(model: str, data: Path, overrides: list[str]) -> float:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlft_ray",
            "eval",
            model,
            "--dataset",
            str(data / "arith_test.jsonl"),
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(proc.stdout)["accuracy"])


def rsft_offline(
    samples: Path, base: str, data: Path, epochs: int, seed: int, out: Path
) -> dict[str, Any]:
    """Supervised fine-tuning of the base on the set's reward-1 samples (one RSFT round)."""
    import torch

    from rlft_ray.lm.loading import load_model_and_tokenizer
    from rlft_ray.lm.sft import supervised_finetune

    torch.set_num_threads(1)
    rows = [json.loads(x) for x in samples.open()]
    kept = [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows if r["reward"] >= 1.0]
    model, tok = load_model_and_tokenizer(base)
    start = time.perf_counter()
    steps = max(1, epochs * len(kept) // 64)
    supervised_finetune(
        model,
        tok,
        kept,
        seconds=600,
        max_steps=steps,
        batch_size=64,
        lr=1e-3,
        warmup_steps=5,
        seed=seed,
    )
    train_s = time.perf_counter() - start
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"kept": len(kept), "steps": steps, "train_s": round(train_s, 1)}


def best_worst_pairs(samples: Path, out: Path) -> int:
    """DPO pairs from the set: the best and the worst sample of each prompt (reward spread only)."""
    groups: dict[str, list[dict]] = {}
    for line in samples.open():
        r = json.loads(line)
        if str(r["completion"]).strip():
            groups.setdefault(r["prompt"], []).append(r)
    pairs = []
    for prompt, rows in groups.items():
        rows.sort(key=lambda r: -r["reward"])
        if (
            rows[0]["reward"] > rows[-1]["reward"]
            and rows[0]["completion"] != rows[-1]["completion"]
        ):
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": rows[0]["completion"],
                    "rejected": rows[-1]["completion"],
                }
            )
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return len(pairs)


def sample_set(args: argparse.Namespace, data: Path, work: Path) -> Path:
    """``rlft-ray sample`` of the base on ``--sample-prompts`` prompts, every sample kept."""
    sample_dir = work / "samples"
    prompts = work / "sample_prompts.jsonl"
    lines = (data / "arith_train.jsonl").read_text().splitlines()[: args.sample_prompts]
    prompts.write_text("\n".join(lines) + "\n")
    wall = run_cli(
        "sample",
        str(ROOT / "examples/arithmetic_rsft.yaml"),
        f"lm.model={args.base}",
        f"lm.prompts={prompts}",
        "rsft.select=all",
        "rsft.min_reward=null",
        "--output-dir",
        str(sample_dir),
        "--no-progress",
    )
    samples = sample_dir / "accepted.jsonl"
    info = json.loads((sample_dir / "summary.json").read_text())
    emit(
        {
            "benchmark": "sample_set",
            "samples": info["samples"],
            "reward_mean": info["reward_mean_all"],
            "command_wall_s": round(wall, 1),
        }
    )
    return samples


def main() -> None:
    os.environ.setdefault("RAY_ADDRESS", "local")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=None, help="an SFT base (default: a fresh quickstart's)")
    p.add_argument("--data", type=Path, default=None, help="its arith_{train,test}.jsonl folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--sample-prompts",
        type=int,
        default=None,
        help="prompts of the ILQL set (x 8 samples; default: all of arith_train.jsonl)",
    )
    p.add_argument("--skip", nargs="*", default=[], help="parts to skip: trl, pairs, ilql")
    p.add_argument("--algos", nargs="*", default=list(PAIR_ALGOS), help="pair algorithms to run")
    p.add_argument(
        "--samples", type=Path, default=None, help="reuse this ILQL set (an accepted.jsonl)"
    )
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlft_pref_algos_"))
    if args.base is None:
        q = work / "q"
        wall = run_cli("quickstart", "--output-dir", str(q), "total_iterations=1")
        args.base, args.data = str(q / "sft_base"), q / "data"
        emit({"benchmark": "quickstart_base", "base": args.base, "command_wall_s": round(wall, 1)})
    data = Path(args.data).resolve()
    if "trl" not in args.skip:
        emit(trl_checks())
    base_acc = eval_with(args.base, data, QUICKSTART_EVAL)
    emit({"benchmark": "base", "base": args.base, "accuracy": base_acc, **sft_info(args.base)})
    common = [f"lm.model={args.base}", f"lm.eval_prompts={data / 'arith_test.jsonl'}"]
    pair_rows: list[dict[str, Any]] = []
    value_rows: list[dict[str, Any]] = []
    if "pairs" not in args.skip:
        if not (data / "arith_prefs_train.jsonl").is_file():
            run_cli("make-arith-prefs", str(data), "--from", args.base)
        if not (data / "arith_kto_train.jsonl").is_file():
            run_cli(
                "make-arith-prefs",
                str(data),
                "--from",
                args.base,
                "--format",
                "kto",
                "--name",
                "arith_kto",
            )
        for seed in args.seeds:
            for algo in args.algos:
                src = (
                    f"kto.data={data / 'arith_kto_train.jsonl'}"
                    if algo == "kto"
                    else f"lm.pairs={data / 'arith_prefs_train.jsonl'}"
                )
                row = trained(
                    algo,
                    f"examples/arithmetic_{algo}.yaml",
                    [*common, src, f"seed={seed}"],
                    data,
                    base_acc,
                    20.0,
                )
                pair_rows.append({"seed": seed, **row})
                emit({"benchmark": "preference", **pair_rows[-1]})
        for line in medians(pair_rows, 20.0):
            emit(line)
    if "ilql" not in args.skip:
        samples = args.samples.resolve() if args.samples else sample_set(args, data, work)
        pairs = work / "sample_pairs.jsonl"
        n_pairs = best_worst_pairs(samples, pairs)
        for seed in args.seeds:
            row = trained(
                "ilql",
                "examples/arithmetic_ilql.yaml",
                [*common, f"ilql.data={samples}", f"seed={seed}"],
                data,
                base_acc,
                15.0,
                {"bc_only_beta0": ["lm.decode_beta=0"], "beta8": ["lm.decode_beta=8"]},
            )
            value_rows.append({"seed": seed, **row})
            emit({"benchmark": "value_based", **value_rows[-1]})
            out = work / f"rsft_{seed}"
            info = rsft_offline(samples, args.base, data, 1, seed, out)
            acc = eval_with(str(out), data, QUICKSTART_EVAL)
            value_rows.append(
                {
                    "seed": seed,
                    "algo": "rsft_offline",
                    **info,
                    "base_accuracy": round(base_acc, 4),
                    "final_accuracy": round(acc, 4),
                    "gain_points": round(100 * (acc - base_acc), 1),
                }
            )
            emit({"benchmark": "value_based", **value_rows[-1]})
            row = trained(
                "dpo_same_set",
                "examples/arithmetic_dpo.yaml",
                [*common, f"lm.pairs={pairs}", f"seed={seed}"],
                data,
                base_acc,
                15.0,
            )
            value_rows.append({"seed": seed, "pairs": n_pairs, **row})
            emit({"benchmark": "value_based", **value_rows[-1]})
        for line in medians(value_rows, 15.0, judged=("ilql",)):  # RSFT, DPO: comparisons
            emit(line)


if __name__ == "__main__":
    main()
