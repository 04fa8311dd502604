"""LoRA via peft: only adapters train, are published and checkpointed; the reference is
the base with adapters off; checkpoints load for resume, init_from, eval and export."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlft_ray.apps.export import export_checkpoint
from rlft_ray.config import ConfigError, LMConfig, LoRAConfig, build_config
from rlft_ray.learners.checkpoint import Counters, load_modules, read_state, save_checkpoint
from rlft_ray.lm.loading import load_model_and_tokenizer
from rlft_ray.lm.lora import LoRAReference, check_lora, linear_module_names
from rlft_ray.lm.policy import PolicyWithValueHead, response_forward
from rlft_ray.lm.tiny import make_tiny_model
from rlft_ray.rollout.generation import GenerationActor

from lm_helpers import make_batch, make_learner

LORA = ("lm.lora.r=4", "lm.lora.alpha=8", "lm.num_samples=4", "lm.max_new_tokens=5")


def _logps(module: torch.nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        out = response_forward(
            module,
            torch.tensor(batch.prompt_ids),
            torch.tensor(batch.prompt_mask),
            torch.tensor(batch.response_ids),
            torch.tensor(batch.response_mask),
            entropy=False,
        )
    return out.logprobs * torch.tensor(batch.response_mask)


def _save(learner, path: Path) -> None:
    save_checkpoint(
        path,
        learner.modules(),
        learner.optimizer,
        Counters(iteration=2),
        learner.cfg,
        {},
        learner.save_extras,
    )


def test_lora_config_keys_and_errors(model_dir: Path) -> None:
    cfg = build_config(
        overrides=["lm.lora.r=16", "lm.lora.alpha=32", "lm.lora.target_modules=[c_attn]"]
    )
    assert cfg.lm.lora == LoRAConfig(r=16, alpha=32.0, target_modules=("c_attn",))
    assert not LMConfig().lora.enabled
    with pytest.raises(ConfigError, match=r"lm\.lora\.r: must be >= 0"):
        build_config(overrides=["lm.lora.r=-1"])
    model_cfg = AutoConfig.from_pretrained(model_dir)
    with pytest.raises(
        ConfigError, match=r"lm\.lora\.target_modules: \['q_proj'\] match no layer"
    ) as e:
        check_lora(LoRAConfig(r=4, target_modules=("q_proj",)), model_cfg)
    assert "c_attn" in str(e.value)  # names what the architecture has
    check_lora(LoRAConfig(r=4, target_modules=("c_attn", "c_fc")), model_cfg)


def test_missing_peft_names_the_key(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(
        ConfigError, match=r"lm\.lora\.r: LoRA needs the peft package.*rlft-ray\[lora\]"
    ):
        check_lora(LoRAConfig(r=4), AutoConfig.from_pretrained(model_dir))
    check_lora(LoRAConfig(r=0), AutoConfig.from_pretrained(model_dir))  # off: peft not needed


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_default_targets_cover_every_linear_layer(tmp_path: Path, arch: str) -> None:
    path = make_tiny_model(
        tmp_path / arch, arch=arch, n_layer=1, hidden=32, n_head=2, max_positions=64
    )
    learner = make_learner("grpo", path, *LORA)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in learner.core.policy_state()}
    assert adapted == set(linear_module_names(AutoModelForCausalLM.from_pretrained(path)))
    assert adapted >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_only_adapters_train_and_the_reference_is_the_base(model_dir: Path) -> None:
    batch = make_batch(model_dir)
    learner = make_learner("grpo", model_dir, *LORA)
    core = learner.core
    assert isinstance(core.reference, LoRAReference)  # no second model in memory
    base = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    frozen = {k: v.clone() for k, v in core.model.state_dict().items() if ".lora_" not in k}
    published = core.policy_state()
    assert published and all(".lora_" in k for k in published)
    n_params = sum(p.numel() for p in core.trainable())
    assert n_params == sum(v.numel() for v in published.values())  # optimizer: adapters only

    for _ in range(3):
        learner.update(batch, progress=0.0)
    after = core.model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # base weights untouched
    assert any(v.abs().sum() > 0 for k, v in core.policy_state().items() if "lora_B" in k)
    policy, ref, plain = (
        _logps(core.policy, batch),
        _logps(core.reference, batch),
        _logps(base, batch),
    )
    torch.testing.assert_close(ref, plain, atol=1e-5, rtol=0)  # adapters off == base model
    assert (policy - plain).abs().max() > 1e-3  # while the policy itself moved


def test_actor_with_published_adapters_matches_the_learner(model_dir: Path) -> None:
    batch = make_batch(model_dir)
    learner = make_learner("grpo", model_dir, *LORA)
    for _ in range(2):
        learner.update(batch, progress=0.0)
    actor = GenerationActor(learner.cfg.lm, seed=0)
    full = sum(
        v.numel() for v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().values()
    )
    state = learner.policy_state()
    assert sum(v.numel() for v in state.values()) < full / 4  # what a weight sync ships
    assert actor.set_weights(state, 7) == 7
    torch.testing.assert_close(
        _logps(PolicyWithValueHead(actor.model), batch), _logps(learner.core.policy, batch)
    )
    with pytest.raises(KeyError, match="do not fit"):
        actor.set_weights(AutoModelForCausalLM.from_pretrained(model_dir).state_dict(), 8)


def test_bf16_actors_keep_adapters_unmerged(model_dir: Path) -> None:
    """Merging and unmerging in bf16 would round the base weights a little more every sync."""
    learner = make_learner("grpo", model_dir, *LORA)
    learner.update(make_batch(model_dir), progress=0.0)
    lm = dataclasses.replace(learner.cfg.lm, dtype="bfloat16")
    actor = GenerationActor(lm, seed=0)
    base = {k: v.clone() for k, v in actor.model.state_dict().items() if "base_layer" in k}
    for version in range(3):
        actor.set_weights(learner.policy_state(), version)
    assert not actor.merge_lora and not actor.merged
    assert all(torch.equal(v, actor.model.state_dict()[k]) for k, v in base.items())


def test_checkpoint_holds_adapters_and_loads_for_resume_eval_and_export(
    model_dir: Path, tmp_path: Path
) -> None:
    batch = make_batch(model_dir)
    learner = make_learner("grpo", model_dir, *LORA)
    learner.update(batch, progress=0.0)
    learner.update(batch, progress=0.0)
    ckpt = tmp_path / "ckpt"
    _save(learner, ckpt)
    files = {p.name for p in (ckpt / "policy").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files  # adapters only
    read_state(ckpt)

    fresh = make_learner("grpo", model_dir, *LORA)  # --resume
    assert load_modules(ckpt, fresh.modules()) == ["policy"]
    torch.testing.assert_close(_logps(fresh.core.policy, batch), _logps(learner.core.policy, batch))

    merged, _ = load_model_and_tokenizer(ckpt / "policy")  # eval / DPO reference path
    torch.testing.assert_close(
        _logps(PolicyWithValueHead(merged.eval()), batch),
        _logps(learner.core.policy, batch),
        atol=1e-5,
        rtol=0,
    )
    info = export_checkpoint(ckpt, tmp_path / "out")
    assert info["lora_merged"] and not any("lora" in f.name for f in (tmp_path / "out").iterdir())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not any(".lora_" in k for k in exported.state_dict())
    torch.testing.assert_close(
        _logps(PolicyWithValueHead(exported), batch),
        _logps(learner.core.policy, batch),
        atol=1e-5,
        rtol=0,
    )


def test_init_from_a_lora_checkpoint_makes_it_the_reference(
    model_dir: Path, tmp_path: Path
) -> None:
    batch = make_batch(model_dir)
    first = make_learner("grpo", model_dir, *LORA)
    for _ in range(2):
        first.update(batch, progress=0.0)
    _save(first, tmp_path / "a")

    second = make_learner("grpo", model_dir, *LORA, f"init_from={tmp_path / 'a'}")
    load_modules(tmp_path / "a", second.modules())
    second.after_init_from()
    start = _logps(first.core.policy, batch)
    torch.testing.assert_close(_logps(second.core.reference, batch), start)
    second.update(batch, progress=0.0)
    torch.testing.assert_close(_logps(second.core.reference, batch), start)  # stays put
    assert (_logps(second.core.policy, batch) - start).abs().max() > 0

    resumed = make_learner("grpo", model_dir, *LORA, f"init_from={tmp_path / 'a'}")
    resumed.load_start_point(tmp_path / "a")  # --resume of the init_from run
    torch.testing.assert_close(_logps(resumed.core.reference, batch), start)

    full = tmp_path / "full"  # a full-weights checkpoint cannot seed adapters
    _save(make_learner("grpo", model_dir), full)
    model_cfg = AutoConfig.from_pretrained(model_dir)
    with pytest.raises(ConfigError, match="init_from: .* holds a full model"):
        check_lora(LoRAConfig(r=4), model_cfg, str(full))
    check_lora(LoRAConfig(r=4), model_cfg, str(tmp_path / "a"), str(model_dir))
    other = make_tiny_model(tmp_path / "other", n_layer=1, hidden=32, n_head=2, max_positions=64)
    with pytest.raises(ConfigError, match="init_from: .* adapters were trained on"):
        check_lora(LoRAConfig(r=4), model_cfg, str(tmp_path / "a"), str(other))
    with pytest.raises(ConfigError, match="lm.model: .* holds LoRA adapters"):
        check_lora(LoRAConfig(r=4), model_cfg, None, str(tmp_path / "a" / "policy"))


def test_lm_ppo_trains_value_head_and_adapters(model_dir: Path) -> None:
    learner = make_learner("lm_ppo", model_dir, *LORA)
    names = {id(p) for p in learner.core.trainable()}
    assert all(id(p) in names for p in learner.core.value_head.parameters())
    head0 = learner.core.value_head.weight.detach().clone()
    metrics = learner.update(make_batch(model_dir), progress=0.0)
    assert metrics["loss/value"] > 0
    assert not torch.equal(head0, learner.core.value_head.weight)


def test_rsft_reset_to_base_resets_the_adapters(model_dir: Path) -> None:
    learner = make_learner("rsft", model_dir, *LORA, "rsft.reset_to_base=true")
    start = learner.core.policy_state()
    learner.core.reset_to_start()
    assert all(torch.equal(start[k], v) for k, v in learner.core.policy_state().items())
    assert sum(p.numel() for p in learner.core.trainable()) == sum(
        v.numel() for v in start.values()
    )


def test_a_refreshed_reference_is_adapters_and_round_trips(model_dir: Path, tmp_path: Path) -> None:
    """Online DPO's ``ref_refresh_every``: the reference becomes the policy so far (its
    adapters, not a model copy), and a checkpoint restores it."""
    batch = make_batch(model_dir)
    learner = make_learner("grpo", model_dir, *LORA)
    learner.core.save_reference = True
    for _ in range(2):
        learner.update(batch, progress=0.0)
    learner.core.reset_reference()
    torch.testing.assert_close(
        _logps(learner.core.reference, batch), _logps(learner.core.policy, batch)
    )
    _save(learner, tmp_path / "c")
    assert (tmp_path / "c" / "reference.safetensors").is_file()

    fresh = make_learner("grpo", model_dir, *LORA)
    fresh.core.save_reference = True
    assert sorted(load_modules(tmp_path / "c", fresh.modules())) == ["policy", "reference"]
    torch.testing.assert_close(
        _logps(fresh.core.reference, batch), _logps(learner.core.reference, batch)
    )
