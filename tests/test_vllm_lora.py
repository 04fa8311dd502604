"""LoRA with the vLLM backend: published adapters served through vLLM's LoRA support
(``LoRARequest``) on unchanged base weights, and ``rlft-ray eval`` with ``lm.backend=vllm``
of a bare model and of a LoRA checkpoint's adapter directory (base + adapters in vLLM).

Needs vLLM (skipped without it). One engine runs at a time in this process: each test
closes its own.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from vllm_helpers import LOGPROB_TOL, logprob_gap, tiny_llama, vllm_lm

from rlft_ray.cli import main
from rlft_ray.config import LoRAConfig
from rlft_ray.lm.lora import adapter_state, adapter_tensors, apply_lora
from rlft_ray.lm.policy import PolicyWithValueHead
from rlft_ray.rollout.evaluate import evaluate_model
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.types import Prompt

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
pytest.importorskip("peft")

DATA = Path(__file__).resolve().parent.parent / "data"
LORA = LoRAConfig(r=8, alpha=16)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("vllm_lora") / "llama")


def _peft_policy(llama_dir: Path) -> PolicyWithValueHead:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    return PolicyWithValueHead(apply_lora(base, LORA, base_path=str(llama_dir)).eval())


def _lora_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("rlft_ray_lora_*"))


def test_lora_adapters_served_by_vllm_match_the_hf_peft_forward(llama_dir: Path) -> None:
    actor = GenerationActor(vllm_lm(llama_dir, lora=LORA), seed=0, num_threads=2)
    try:
        policy = _peft_policy(llama_dir)
        assert actor.lora and actor.engine.lora_rank == 8
        # the actor expects exactly the learner's adapter names
        assert actor._tensor_names == set(adapter_tensors(policy.lm))
        prompts = [Prompt(t, actor.tokenizer(t)["input_ids"]) for t in ("1+2=", "hello", "57+8=")]
        # before the first sync the base model samples: peft's B = 0 adapters are the base
        gaps = [logprob_gap(policy, actor.generate(prompts))]
        before_dirs = _lora_dirs()
        generator = torch.Generator().manual_seed(0)
        for version in (1, 2, 3):
            with torch.no_grad():
                for param in adapter_tensors(policy.lm).values():
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
            old = actor.generate(prompts)
            assert actor.set_weights(adapter_state(policy.lm), version) == version
            new = actor.generate(prompts)
            assert new.policy_version == version
            assert logprob_gap(policy, old) > 10 * LOGPROB_TOL  # the new adapters took
            gaps.append(logprob_gap(policy, new))
        assert max(gaps) < LOGPROB_TOL, gaps
        assert _lora_dirs() == before_dirs  # each version's adapter directory is removed
        # the engine serves one adapter set: the latest
        assert actor.engine.llm.llm_engine.list_loras() == {actor.engine.lora_request.lora_int_id}
    finally:
        actor.close()


def test_eval_of_a_lora_checkpoint_with_vllm_matches_hf(llama_dir: Path, tmp_path: Path) -> None:
    """A LoRA checkpoint's ``policy/`` (adapter directory naming its base): vLLM serves
    base + adapters, HF merges them; greedy completions are the same."""
    policy = _peft_policy(llama_dir)
    with torch.no_grad():
        for name, param in adapter_tensors(policy.lm).items():
            if ".lora_B." in name:  # B = 0 would be the base model
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    from transformers import AutoTokenizer

    policy.lm.save_pretrained(tmp_path / "policy")  # as a LoRA run's checkpoint holds it
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(tmp_path / "policy")
    lm = vllm_lm(llama_dir, max_new_tokens=6)
    dataset = DATA / "arith_test.jsonl"
    with_vllm = evaluate_model(tmp_path / "policy", dataset, lm, limit=12)
    with_hf = evaluate_model(
        tmp_path / "policy", dataset, dataclasses.replace(lm, backend="hf"), limit=12
    )
    base = evaluate_model(llama_dir, dataset, dataclasses.replace(lm, backend="hf"), limit=12)
    assert with_vllm["examples"] == with_hf["examples"]
    assert with_vllm["completion_tokens_mean"] == with_hf["completion_tokens_mean"]
    assert with_vllm["examples"] != base["examples"]  # the adapters changed the completions


def test_eval_cli_with_vllm_backend_on_a_model_dir(
    llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """``rlft-ray eval MODEL_DIR --dataset ... lm.backend=vllm`` scores as ``hf`` does."""
    results = {}
    for backend in ("vllm", "hf"):
        code = main(
            [
                "eval",
                str(llama_dir),
                "--dataset",
                str(DATA / "arith_test.jsonl"),
                "--limit",
                "8",
                f"lm.backend={backend}",
                "lm.max_new_tokens=6",
            ]
        )
        assert code == 0
        results[backend] = json.loads(capsys.readouterr().out)
    assert results["vllm"]["num_prompts"] == 8
    assert results["vllm"]["examples"] == results["hf"]["examples"]
    assert np.isclose(results["vllm"]["accuracy"], results["hf"]["accuracy"])
