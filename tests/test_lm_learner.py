"""LM learners without Ray: updates, checkpoints through from_pretrained, DDP/micro-batch gradients."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlft_ray.algorithms import aggregate_loss_parts
from rlft_ray.cli import main
from rlft_ray.config import ConfigError, build_config
from rlft_ray.learners import checkpoint as ckpt
from rlft_ray.learners.base import LearnerContext
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.lm.tiny import make_tiny_model
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.types import GenerationBatch, Prompt

from lm_helpers import first_step_grads, free_port, make_batch, make_learner, slice_batch

# Settings under which one step sees the whole batch (so 1 and 2 ranks must agree).
CASES = {
    "grpo-token-mean-kl-loss": (
        "grpo",
        ["grpo.loss_agg=token-mean", "grpo.kl_coef=0.1", "grpo.kl_in=loss"],
    ),
    "rloo-seq-mean-kl-reward": (
        "grpo",
        ["grpo.estimator=rloo", "grpo.kl_coef=0.1", "grpo.kl_in=reward"],
    ),
    "reinforce-seq-sum": ("grpo", ["grpo.estimator=reinforce", "grpo.loss_agg=seq-mean-token-sum"]),
    "lm-ppo-value-head": ("lm_ppo", ["lm_ppo.num_epochs=1", "lm_ppo.value_head_init_std=0.1"]),
    # REINFORCE++: token returns whitened over both ranks' tokens, KL per token in the reward
    "reinforce-pp-baseline-kl-reward": (
        "grpo",
        [
            "grpo.estimator=reinforce_pp_baseline",
            "grpo.kl_coef=0.1",
            "grpo.kl_in=reward",
            "grpo.kl_estimator=k1",
        ],
    ),
    # LoRA: only adapter gradients, all-reduced over the ranks the same way
    "grpo-lora-kl-loss": ("grpo", ["lm.lora.r=4", "lm.lora.alpha=8", "grpo.kl_coef=0.1"]),
}


def test_aggregate_loss_parts_hand_values() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    num, den = aggregate_loss_parts(loss, mask, "token-mean")
    assert (num.item(), den.item()) == (10.0, 4.0)
    num, den = aggregate_loss_parts(loss, mask, "seq-mean-token-mean")
    assert (num.item(), den.item()) == (2.0 + 4.0, 2.0)
    num, den = aggregate_loss_parts(loss, mask, "seq-mean-token-sum")
    assert (num.item(), den.item()) == (10.0, 2.0)
    # shards add up to the full-batch aggregate
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        parts = [aggregate_loss_parts(loss[i : i + 1], mask[i : i + 1], mode) for i in range(2)]
        total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        num, den = aggregate_loss_parts(loss, mask, mode)  # the whole batch at once
        assert torch.allclose(total, num / den)


@pytest.mark.parametrize("algo", ["grpo", "lm_ppo"])
def test_update_moves_policy_and_reports_metrics(model_dir: Path, algo: str) -> None:
    learner = make_learner(algo, model_dir, f"{algo}.micro_batch_size=5", f"{algo}.kl_coef=0.05")
    before = {k: v.clone() for k, v in learner.policy_state().items()}
    metrics = learner.update(make_batch(model_dir), progress=0.0)
    after = learner.policy_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in (
        "reward/mean",
        "kl/mean",
        "loss/policy",
        "loss/entropy",
        "loss/grad_norm",
        "perf/learner_tokens_per_s",
        "optim/lr",
    ):
        assert np.isfinite(metrics[key]), key
    assert metrics["optim/grad_accum_steps"] == 4.0  # 16 rows in micro-batches of 5
    assert metrics["rollout/flat_group_frac"] >= 0.25
    if algo == "lm_ppo":
        assert "loss/value" in metrics and "value/explained_variance" in metrics


@pytest.mark.parametrize("algo", ["grpo", "lm_ppo"])
def test_kl_only_reported_runs_the_reference_every_track_kl_every(
    model_dir: Path, algo: str
) -> None:
    batch = make_batch(model_dir)
    whole = f"{algo}.micro_batch_size={len(batch)}"  # one forward per pass
    every_3 = make_learner(algo, model_dir, whole, f"{algo}.kl_coef=0", "lm.track_kl_every=3")
    every_1 = make_learner(algo, model_dir, whole, f"{algo}.kl_coef=0", "lm.track_kl_every=1")
    calls = []
    forward = every_3.core.reference.forward
    every_3.core.reference.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    reported = [("kl/mean" in every_3.update(batch, progress=0.0)) for _ in range(7)]
    assert reported == [True, False, False, True, False, False, True]
    assert len(calls) == 3  # one reference forward per reported update, none otherwise
    for _ in range(7):
        assert "kl/mean" in every_1.update(batch, progress=0.0)
    # the KL is only reported: both learned exactly the same thing
    for key, value in every_1.policy_state().items():
        torch.testing.assert_close(every_3.policy_state()[key], value, rtol=0, atol=0)
    # a coefficient > 0 puts the KL in the objective: it is needed on every update
    in_loss = make_learner(algo, model_dir, f"{algo}.kl_coef=0.05", "lm.track_kl_every=3")
    assert all("kl/mean" in in_loss.update(batch, progress=0.0) for _ in range(3))
    # ... and in float32; a reference only reported is kept in bf16 (half the memory)
    dtypes = {m: {p.dtype for p in m.core.reference.parameters()} for m in (every_1, in_loss)}
    assert dtypes[every_1] == {torch.bfloat16} and dtypes[in_loss] == {torch.float32}
    # which reports the KL of an unchanged policy as about 0 (bf16 rounding), not exactly 0
    fresh = make_learner(algo, model_dir, whole, f"{algo}.kl_coef=0")  # KL before the step
    assert abs(fresh.update(batch, progress=0.0)["kl/mean"]) < 2e-3  # k1 (PPO) can be < 0


def test_lr_schedule(model_dir: Path) -> None:
    core = make_learner(
        "grpo", model_dir, "grpo.optim.lr_schedule=cosine", "grpo.optim.warmup_fraction=0.1"
    ).core
    assert core.engine.set_lr(0.05) == pytest.approx(0.5e-3)
    assert core.engine.set_lr(0.1) == pytest.approx(1e-3)
    assert core.engine.set_lr(0.55) == pytest.approx(0.5e-3)
    assert core.engine.set_lr(1.0) == pytest.approx(0.0, abs=1e-12)
    assert core.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_checkpoint_round_trip_through_from_pretrained(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = make_learner("lm_ppo", model_dir)
    learner.update(make_batch(model_dir), progress=0.0)
    path = tmp_path / "ck"
    counters = ckpt.Counters(iteration=3, env_steps=48, policy_version=3)
    sig = {"observation": "Text", "action": "Discrete(95)"}
    ckpt.save_checkpoint(
        path,
        learner.modules(),
        learner.optimizer,
        counters,
        learner.cfg,
        sig,
        extras=learner.save_extras,
    )
    for name in (
        "policy/model.safetensors",
        "policy/config.json",
        "policy/tokenizer.json",
        "value_head.safetensors",
        "optimizer.pt",
        "state.json",
    ):
        assert (path / name).is_file(), name
    assert ckpt.read_state(path)["counters"]["iteration"] == 3

    model = AutoModelForCausalLM.from_pretrained(path / "policy").eval()
    tok = AutoTokenizer.from_pretrained(path / "policy")
    x = torch.tensor([tok("12+34=")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, learner.core.model.eval()(x).logits, atol=1e-6)

    fresh = make_learner("lm_ppo", model_dir)
    assert ckpt.load_modules(path, fresh.modules()) == ["policy", "value_head"]
    for key, value in learner.core.policy.state_dict().items():
        assert torch.equal(value, fresh.core.policy.state_dict()[key]), key
    assert ckpt.load_training_state(path, fresh.optimizer).policy_version == 3
    # the reference stays the base model; init_from makes the loaded policy the reference
    ref = fresh.core.reference.lm.state_dict()
    assert not all(torch.equal(ref[k], v) for k, v in fresh.core.model.state_dict().items())
    fresh.after_init_from()
    ref = fresh.core.reference.lm.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in fresh.core.model.state_dict().items())


def test_eval_command_on_checkpoint_and_model_dir(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    learner = make_learner("grpo", model_dir)
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(6))
    )
    path = tmp_path / "ck"
    ckpt.save_checkpoint(
        path,
        learner.modules(),
        learner.optimizer,
        ckpt.Counters(),
        learner.cfg,
        {},
        extras=learner.save_extras,
    )
    assert main(["eval", str(path), "--dataset", str(data), "--limit", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (
        result["num_prompts"] == 4
        and 0.0 <= result["accuracy"] <= 1.0
        and len(result["examples"]) == 3
    )
    assert (
        main(["eval", str(model_dir), "--dataset", str(data)]) == 0
    )  # a bare save_pretrained directory
    assert json.loads(capsys.readouterr().out)["num_prompts"] == 6
    assert main(["eval", str(path)]) == 2  # no --dataset and no lm.eval_prompts
    assert "--dataset" in capsys.readouterr().err


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, port: int, model_dir: str, batch: GenerationBatch, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        half = len(batch) // 2
        mine = slice_batch(batch, slice(rank * half, (rank + 1) * half))
        for name, (algo, overrides) in CASES.items():
            torch.manual_seed(0)
            learner = make_learner(
                algo, Path(model_dir), *overrides, f"{algo}.micro_batch_size=3", rank=rank, world=2
            )
            grads = first_step_grads(learner, mine)
            torch.save(grads, Path(out_dir) / f"{name}-rank{rank}.pt")
            del learner  # free the DDP reducer while the process group is alive
            gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_and_micro_batching_match_one_worker(model_dir: Path, tmp_path: Path) -> None:
    batch = make_batch(model_dir, n_prompts=4)  # 16 rows: 8 per rank = 2 whole groups
    mp.spawn(
        _ddp_worker, args=(free_port(), str(model_dir), batch, str(tmp_path)), nprocs=2, join=True
    )
    for name, (algo, overrides) in CASES.items():
        torch.manual_seed(0)
        full = first_step_grads(
            make_learner(algo, model_dir, *overrides, f"{algo}.micro_batch_size=64"), batch
        )
        torch.manual_seed(0)
        micro = first_step_grads(
            make_learner(algo, model_dir, *overrides, f"{algo}.micro_batch_size=3"), batch
        )
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(2)]
        assert set(full) == set(micro) == set(ranks[0]) and len(full) > 5
        assert any(g.abs().max() > 0 for g in full.values())
        for key, g in full.items():
            for other, label in (
                (micro, "micro-batched"),
                (ranks[0], "DDP rank 0"),
                (ranks[1], "DDP rank 1"),
            ):
                torch.testing.assert_close(
                    other[key], g, atol=2e-6, rtol=1e-4, msg=f"{name}: {label} grad of {key}"
                )


@pytest.mark.gpu
def test_update_on_gpu_with_bf16_autocast(model_dir: Path) -> None:
    cfg = build_config(overrides=["algo=grpo", f"lm.model={model_dir}", "grpo.kl_coef=0.05"])
    learner = get_learner_cls("grpo")(cfg, None, LearnerContext(device=torch.device("cuda", 0)))
    assert next(learner.core.policy.parameters()).device.type == "cuda"
    metrics = learner.update(make_batch(model_dir), progress=0.0)
    assert np.isfinite(metrics["loss/policy"]) and np.isfinite(metrics["kl/mean"])
    state = learner.policy_state()
    assert all(v.device.type == "cpu" for v in state.values())  # what the actors receive
    actor = GenerationActor(cfg.lm, device="cuda")
    actor.set_weights(state, 1)
    assert (
        len(actor.generate([Prompt("1+2=", actor.tokenizer("1+2=")["input_ids"], {})]))
        == cfg.lm.num_samples
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_other_architectures_sample_and_learn(tmp_path: Path, arch: str) -> None:
    model_dir = make_tiny_model(
        tmp_path / arch, arch=arch, n_layer=1, hidden=32, n_head=4, max_positions=64
    )
    batch = make_batch(model_dir)
    learner = make_learner("lm_ppo", model_dir, "lm_ppo.num_epochs=1")
    # the learner's first forward pass reproduces the sampler's log-probs (RoPE, GQA, left padding)
    t = learner.core.tensors(batch)
    out = learner.core.forward(learner.core.policy, t, torch.arange(len(batch)))
    mask = t["mask"][:, : out.logprobs.shape[1]]
    assert torch.allclose(
        out.logprobs[mask], t["old_logprobs"][:, : out.logprobs.shape[1]][mask], atol=1e-4
    )
    metrics = learner.update(batch, progress=0.0)
    assert np.isfinite(metrics["loss/value"]) and np.isfinite(metrics["loss/policy"])


def test_async_checkpoint_keeps_the_prompts_of_the_batch_in_flight(model_dir: Path) -> None:
    """With async_rollouts the loop takes the next batch's prompts before the update it
    checkpoints; --resume must sample them again, not skip them."""

    class Stream:  # a prompt stream that counts the batches taken
        taken = 0

        def next(self) -> list[int]:
            self.taken += 1
            return [self.taken] * 4

        def state(self) -> dict[str, np.ndarray]:
            return {"stream_taken": np.array(self.taken)}

    for overlap, expected in ((True, 1), (False, 2)):
        learner = make_learner("grpo", model_dir, f"async_rollouts={str(overlap).lower()}")
        learner.core.prompts = Stream()
        learner.next_sample_args(2)  # batch k, trained on
        learner.next_sample_args(2)  # batch k + 1: in flight at the checkpoint when async
        assert int(learner.rank_state()["stream_taken"]) == expected


def test_async_rollouts_only_for_losses_that_correct_the_lag() -> None:
    with pytest.raises(ConfigError, match="async_rollouts: algo=rsft .* no importance ratio"):
        build_config(overrides=["algo=rsft", "async_rollouts=true"])
    assert build_config(overrides=["algo=grpo", "async_rollouts=true"]).async_rollouts
