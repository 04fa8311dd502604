"""Prompts as the model sees them: ``lm.system_prompt`` (null, a text, or "" for none at all,
the chat template's default system message cut out) and ``lm.prompt_template``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlft_ray.config import ConfigError, build_config
from rlft_ray.lm.chat import find_default_system_block, render_chat
from rlft_ray.lm.prompts import load_prompts, prompts_from_batch, render_prompt
from rlft_ray.lm.tiny import CHAT_TEMPLATE, build_tokenizer

# SmolLM2-Instruct's template: a default system message when the first one is not "system".
SMOL = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5-Instruct's (without tools): the system block is written before the loop.
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Llama-3.1's shape: BOS, then always a system block with dates before the system content.
LLAMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "| trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)
# The tiny tokenizer's "role: content" template with a default system line (every character
# is in its vocabulary, so token ids decode back to the text).
TINY_DEFAULT = (
    "{% if messages[0]['role'] != 'system' %}system: You are a helpful AI assistant.\n{% endif %}"
    + CHAT_TEMPLATE
)
# A template that refuses a system message (and so has no default one).
NO_SYSTEM = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[{{ message['role'] }}] {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
# A default system block that ends unlike the other messages: its end cannot be found.
ODD_END = (
    "{% if messages[0]['role'] == 'system' %}<sys>{{ messages[0]['content'] }}</sys>"
    "{% set rest = messages[1:] %}"
    "{% else %}<sys>Be nice.</sys>{% set rest = messages %}{% endif %}"
    "{% for m in rest %}<{{ m['role'] }}>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n"
)
SMOL_USER = "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"


def _tokenizer(template: str):
    tok = build_tokenizer()
    tok.chat_template = template
    return tok


def _user(text: str = "1+1=") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    ("template", "system_prompt", "expected"),
    [
        (SMOL, None, SMOL_SYSTEM + SMOL_USER),
        (SMOL, "", SMOL_USER),
        (SMOL, "Be brief.", "<|im_start|>system\nBe brief.<|im_end|>\n" + SMOL_USER),
        (
            QWEN,
            None,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\n" + SMOL_USER,
        ),
        (QWEN, "", SMOL_USER),
        (QWEN, "Be brief.", "<|im_start|>system\nBe brief.<|im_end|>\n" + SMOL_USER),
        (
            LLAMA,
            None,
            "<bos><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
            "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\n1+1=<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (
            LLAMA,
            "",
            "<bos><|start_header_id|>user<|end_header_id|>\n\n1+1=<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (CHAT_TEMPLATE, None, "user: 1+1=\nassistant: "),  # no default: nothing to cut
        (CHAT_TEMPLATE, "", "user: 1+1=\nassistant: "),
        (CHAT_TEMPLATE, "Be brief.", "system: Be brief.\nuser: 1+1=\nassistant: "),
        (TINY_DEFAULT, None, "system: You are a helpful AI assistant.\nuser: 1+1=\nassistant: "),
        (TINY_DEFAULT, "", "user: 1+1=\nassistant: "),
        (NO_SYSTEM, "", "[user] 1+1=\n[assistant] "),
    ],
)
def test_system_prompt(template: str, system_prompt: str | None, expected: str) -> None:
    tok = _tokenizer(template)
    assert render_prompt("1+1=", tok, True, system_prompt) == expected
    assert render_chat(tok, _user(), system_prompt) == expected


def test_no_system_prompt_in_conversations() -> None:
    tok = _tokenizer(SMOL)
    turns = [
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2="},
    ]
    # only the default block at the start goes; the turns stay as they are
    assert render_prompt(turns, tok, False, "") == (
        "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
    )
    # a conversation's own system message is kept whatever lm.system_prompt says
    own = [{"role": "system", "content": "Add."}, *_user()]
    expected = "<|im_start|>system\nAdd.<|im_end|>\n" + SMOL_USER
    for system_prompt in (None, "", "Be brief."):
        assert render_prompt(own, tok, False, system_prompt) == expected
    # a prompt that quotes the default message keeps its quote
    quoted = render_prompt(SMOL_SYSTEM, tok, True, "")
    assert quoted == f"<|im_start|>user\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>assistant\n"


def test_default_system_block_found() -> None:
    assert find_default_system_block(_tokenizer(SMOL)) == (0, SMOL_SYSTEM)
    assert find_default_system_block(_tokenizer(LLAMA)) == (
        len("<bos>"),
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|>",
    )
    for template in (CHAT_TEMPLATE, NO_SYSTEM):
        assert find_default_system_block(_tokenizer(template)) is None


def test_a_default_block_whose_end_is_unclear_is_refused() -> None:
    tok = _tokenizer(ODD_END)
    assert (
        render_prompt("1+1=", tok, True, None) == "<sys>Be nice.</sys><user>1+1=<|end|><assistant>"
    )
    with pytest.raises(ConfigError, match="cannot be found") as info:
        render_prompt("1+1=", tok, True, "")
    assert info.value.key == "lm.system_prompt"


# --------------------------------------------------------------------------- prompt_template


@pytest.mark.parametrize(
    ("template", "chat", "system_prompt", "expected"),
    [
        ("{prompt} Reply with only the number.", False, None, "1+1= Reply with only the number."),
        ("Q: {prompt}\nA:", False, None, "Q: 1+1=\nA:"),
        ("Solve {{x}} = {prompt}", False, None, "Solve {x} = 1+1="),  # doubled braces
        (
            "{prompt} Reply with only the number.",
            True,
            "",
            "<|im_start|>user\n1+1= Reply with only the number.<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "{prompt} Reply with only the number.",
            True,
            None,
            SMOL_SYSTEM + "<|im_start|>user\n1+1= Reply with only the number.<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        (None, True, "", SMOL_USER),
    ],
)
def test_prompt_template(
    template: str | None, chat: bool, system_prompt: str | None, expected: str
) -> None:
    tok = _tokenizer(SMOL)
    assert render_prompt("1+1=", tok, chat, system_prompt, template) == expected


def test_prompt_template_leaves_the_prompt_unparsed_and_conversations_alone() -> None:
    tok = _tokenizer(SMOL)
    assert render_prompt("f({x}) = ?", tok, False, None, "[{prompt}]") == "[f({x}) = ?]"
    assert render_prompt(_user(), tok, False, "", "{prompt} Reply.") == SMOL_USER


def test_prompt_options_reach_every_loaded_prompt(tmp_path: Path) -> None:
    """load_prompts (training and held-out prompts, rlft-ray sample and eval) renders with both
    options, and the token ids are those of the rendered text."""
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": _user("2+2="), "answer": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = _tokenizer(TINY_DEFAULT)
    lm = build_config(
        overrides=[
            "lm.chat_template=true",
            "lm.system_prompt=''",
            "lm.prompt_template={prompt} Reply with only the number.",
        ]
    ).lm
    assert lm.system_prompt == "" and lm.prompt_template == "{prompt} Reply with only the number."
    prompts = prompts_from_batch(load_prompts(path, tok, lm)[0])
    assert [p.text for p in prompts] == [
        "user: 1+1= Reply with only the number.\nassistant: ",
        "user: 2+2=\nassistant: ",
    ]
    assert all(tok.decode(p.ids) == p.text for p in prompts)
    default = build_config(overrides=["lm.chat_template=true"]).lm
    assert prompts_from_batch(load_prompts(path, tok, default)[0])[0].text == (
        "system: You are a helpful AI assistant.\nuser: 1+1=\nassistant: "
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("Reply with only the number.", r"must contain \{prompt\} exactly once \(found 0\)"),
        ("{prompt} and again {prompt}", r"exactly once \(found 2\)"),
        ("{prompt} in {braces}", r"only the placeholder \{prompt\}, not \{braces\}"),
        ("{} {prompt}", r"only the placeholder \{prompt\}, not \{\}"),
        ("{prompt} }", r"Single '\}' encountered.*write a literal brace as \{\{ or \}\}"),
        ("{ {prompt}", r"not a valid template"),
        ("{prompt!r}", "without a conversion or format spec"),
        ("{prompt:>20}", "without a conversion or format spec"),
    ],
)
def test_a_bad_prompt_template_names_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:  # quoted: YAML reads {a} as a map
        build_config(overrides=[f"lm.prompt_template='{value}'"])
    assert info.value.key == "lm.prompt_template"
