"""Tests for rlft_ray.lm.tiny: char tokenizer, tiny model factory and loader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlft_ray.lm.loading import fuse_activations, load_model_and_tokenizer
from rlft_ray.lm.tiny import (
    SUPPORTED_ARCHS,
    build_tokenizer,
    make_tiny_model,
)

ARITH_STRINGS = [
    "12+7=19",
    "3+4*2=11\n",
    "(3+4)*2=14",
    "9*99=891",
    "a + b = c?",
    "x: 'q' \"r\" <_#>;!",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.mark.parametrize("text", ARITH_STRINGS)
def test_tokenizer_round_trip(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no BOS/EOS added
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert tokenizer.bos_token == "<bos>" and tokenizer.eos_token == "<eos>"
    assert tokenizer.unk_token == "<unk>"
    ids = tokenizer("12" + tokenizer.eos_token)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12"
    # Characters outside the vocabulary map to <unk>.
    assert tokenizer("é")["input_ids"] == [tokenizer.unk_token_id]


def test_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    msgs = [{"role": "system", "content": "solve"}, {"role": "user", "content": "12+7="}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "system: solve\nuser: 12+7=\nassistant: "
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "system: solve\nuser: 12+7=\n"


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_make_and_load_round_trip(tmp_path: Path, arch: str) -> None:
    out = make_tiny_model(tmp_path / arch, arch=arch, n_layer=1, hidden=32, n_head=4, seed=3)
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".*tmp*")), "temp dir left behind"

    model, tok = load_model_and_tokenizer(str(out))
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id

    # Same seed rebuilds identical weights; the loaded model reproduces them exactly.
    again = make_tiny_model(
        tmp_path / f"{arch}_again", arch=arch, n_layer=1, hidden=32, n_head=4, seed=3
    )
    model2, _ = load_model_and_tokenizer(again)
    x = torch.tensor([tok("12+7=")["input_ids"]])
    model.eval()
    model2.eval()
    with torch.no_grad():
        logits, logits2 = model(x).logits, model2(x).logits
    assert logits.shape == (1, x.shape[1], len(tok))
    assert torch.equal(logits, logits2)


def test_loaded_logits_match_built_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = make_tiny_model(tmp_path / "m", arch="llama", n_layer=1, hidden=32, seed=0)
    raw = AutoModelForCausalLM.from_pretrained(out).eval()
    model, tok = load_model_and_tokenizer(out, dtype="float32")
    model.eval()
    x = torch.tensor([tok("3+4*2=")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(raw(x).logits, model(x).logits)
    other = make_tiny_model(tmp_path / "m_seed1", arch="llama", n_layer=1, hidden=32, seed=1)
    model1, _ = load_model_and_tokenizer(other)
    with torch.no_grad():
        assert not torch.equal(model(x).logits, model1.eval()(x).logits)


def test_gpt2_activations_are_fused_with_the_same_outputs_and_gradients(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = make_tiny_model(tmp_path / "g", arch="gpt2", n_layer=2, hidden=32, n_head=2, seed=0)
    raw = AutoModelForCausalLM.from_pretrained(out).eval()
    model, tok = load_model_and_tokenizer(out)
    model.eval()
    kinds = {type(m).__name__ for m in model.modules()}
    assert "NewGELUActivation" in {type(m).__name__ for m in raw.modules()}
    assert "NewGELUActivation" not in kinds and "GELU" in kinds
    x = torch.tensor([tok("12+34=46")["input_ids"]])
    raw(x).logits.sum().backward()
    model(x).logits.sum().backward()
    torch.testing.assert_close(model(x).logits, raw(x).logits, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), raw.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # a runtime swap: the saved config still names gelu_new, and nothing else is swapped
    model.save_pretrained(tmp_path / "saved")
    assert '"activation_function": "gelu_new"' in (tmp_path / "saved" / "config.json").read_text()
    assert fuse_activations(model) == 0 and fuse_activations(raw) == 2


def test_seed_does_not_disturb_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "m", n_layer=1, hidden=16, n_head=2, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_arch_and_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"gpt2, llama, qwen2"):
        make_tiny_model(tmp_path / "m", arch="mamba")
    with pytest.raises(ValueError, match="divisible"):
        make_tiny_model(tmp_path / "m", hidden=30, n_head=4)
    assert not (tmp_path / "m").exists()


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        make_tiny_model(out, n_layer=1, hidden=16, n_head=2)
    assert (out / "keep.txt").read_text() == "precious"

    make_tiny_model(out, n_layer=1, hidden=16, n_head=2, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp/trash dirs left

    empty = tmp_path / "empty"
    empty.mkdir()
    make_tiny_model(empty, n_layer=1, hidden=16, n_head=2)  # an empty dir is fine
    assert (empty / "config.json").is_file()


def test_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model"
    with pytest.raises(FileNotFoundError, match=r"model path does not exist: .*nope/model"):
        load_model_and_tokenizer(str(missing))
    with pytest.raises(
        FileNotFoundError, match=re.escape("model path does not exist: ./no_such_model_dir")
    ):
        load_model_and_tokenizer("./no_such_model_dir")


def test_pad_defaults_to_eos(tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path / "m", arch="gpt2", n_layer=1, hidden=16, n_head=2)
    tok = build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(out)  # overwrite the saved tokenizer with a pad-less one

    model, loaded = load_model_and_tokenizer(out)
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    assert loaded.pad_token_id == loaded.eos_token_id
    assert model.config.pad_token_id == loaded.eos_token_id
    assert model.generation_config.pad_token_id == loaded.eos_token_id


def test_pad_added_when_no_eos(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    # A tokenizer with neither pad nor eos (and no "<pad>" in its vocab) forces a new token,
    # and a model whose vocab is exactly that tokenizer's must get its embeddings resized.
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate("0123456789+=")}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    bare = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token=None, eos_token=None
    )
    assert bare.pad_token is None and bare.eos_token is None

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_layer=1, n_embd=16, n_head=2, n_positions=32)
    out = tmp_path / "m"
    GPT2LMHeadModel(config).save_pretrained(out)
    bare.save_pretrained(out)

    model, tok = load_model_and_tokenizer(out)
    assert tok.pad_token == "<pad>"
    assert tok.pad_token_id == len(vocab)  # appended after the existing vocabulary
    assert model.get_input_embeddings().num_embeddings == len(vocab) + 1
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    batch = tok(["1+2=", "12+34="], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape == (2, 6, len(vocab) + 1)
