"""A conversation through a tokenizer's chat template, with the system message the config asks.

``lm.system_prompt`` has three settings (:func:`render_chat`):

* ``None``: the template's own behaviour; many instruct templates (SmolLM2, Qwen2.5)
  write a default system message such as "You are a helpful AI assistant ..." when the
  conversation has none.
* a text: that system message, ahead of a conversation that has none of its own.
* ``""``: no system message at all. A template that writes a default one writes it
  whatever the conversation holds (an empty system message still renders as an empty
  system block), so the default block is cut out of the rendered text:
  :func:`default_system_block` finds it by rendering a probe conversation with and
  without a system message of its own.
"""

from __future__ import annotations

from typing import Any

from rlft_ray.config import ConfigError

# Probe contents: plain text that no template rewrites and no template holds.
_SYSTEM_PROBE = "RLFTSYSTEMPROBE"
_USER_PROBE = "RLFTUSERPROBE"

#: Default system blocks found so far, by (chat template, BOS token).
_BLOCKS: dict[tuple[str, str], tuple[int, str] | None] = {}


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def find_default_system_block(tokenizer: Any) -> tuple[int, str] | None:
    """Where the chat template writes a system message of its own, and its text.

    A one-message user conversation is rendered three ways: as it is (``plain``), after
    a probe system message (``probed``), and without the generation prompt. In
    ``probed`` the probe splits the text into what comes before it (BOS and the system
    header) and after it (the system message's end, then the user turn). ``plain``
    holds a default system message exactly when it starts and ends with those two parts;
    the default block then runs from after the BOS token to the end of the default
    content plus the text that closes a message (what follows the user's content when
    the conversation ends there, e.g. ``<|im_end|>\\n``).

    Args:
        tokenizer: A tokenizer with a chat template.

    Returns:
        ``(start, text)`` of the default block in any rendering of a conversation without
        a system message, or None when the template writes no system message of its own
        (or takes none at all: rendering one raises).

    Raises:
        ConfigError: Naming ``lm.system_prompt``: the template writes a default system
            message but its end cannot be told apart from the next turn.
    """
    user = [{"role": "user", "content": _USER_PROBE}]
    plain = _render(tokenizer, user, True)
    try:
        probed = _render(tokenizer, [{"role": "system", "content": _SYSTEM_PROBE}, *user], True)
    except Exception:  # a template that refuses a system role writes no default one
        return None
    at = probed.find(_SYSTEM_PROBE)
    if at < 0:
        return None
    before, after = probed[:at], probed[at + len(_SYSTEM_PROBE) :]
    if not (
        len(plain) >= len(before) + len(after)
        and plain.startswith(before)
        and plain.endswith(after)
    ):
        return None
    closed = _render(tokenizer, user, False)
    end = closed.rfind(_USER_PROBE)
    footer = closed[end + len(_USER_PROBE) :] if end >= 0 else ""
    if not after.startswith(footer):
        raise ConfigError(
            "lm.system_prompt",
            '"" asks for no system message, but where this chat template\'s default one '
            f"ends cannot be found (a message ends with {footer!r}, the system one does not); "
            "set lm.system_prompt to a message of your own, or null for the default",
        )
    bos = getattr(tokenizer, "bos_token", None) or ""
    start = len(bos) if bos and before.startswith(bos) else 0
    return start, plain[start : len(plain) - len(after) + len(footer)]


def default_system_block(tokenizer: Any, fresh: bool = False) -> tuple[int, str] | None:
    """:func:`find_default_system_block`, remembered per chat template and BOS token.

    Args:
        tokenizer: A tokenizer with a chat template.
        fresh: Find it again (a template that writes the date changes its block daily).
    """
    key = (str(tokenizer.chat_template), str(getattr(tokenizer, "bos_token", None) or ""))
    if fresh or key not in _BLOCKS:
        _BLOCKS[key] = find_default_system_block(tokenizer)
    return _BLOCKS[key]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str | None) -> str:
    """``messages`` through the tokenizer's chat template, with the generation prompt.

    Args:
        tokenizer: A tokenizer with a chat template.
        messages: ``{"role", "content"}`` dicts; one with ``role: system`` first is kept
            whatever ``system_prompt`` says.
        system_prompt: None: the template's default; a text: that system message first;
            ``""``: no system message, the template's default one cut out.

    Returns:
        The rendered prompt text.

    Raises:
        ConfigError: Naming ``lm.system_prompt`` when a default system message cannot be
            cut out (see :func:`find_default_system_block`).
    """
    has_system = bool(messages) and messages[0]["role"] == "system"
    if system_prompt and not has_system:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    text = _render(tokenizer, messages, True)
    if system_prompt != "" or has_system:
        return text
    for fresh in (False, True):
        block = default_system_block(tokenizer, fresh=fresh)
        if block is None:
            return text
        start, default = block
        if text[start : start + len(default)] == default:
            return text[:start] + text[start + len(default) :]
    raise ConfigError(
        "lm.system_prompt",
        '"" asks for no system message, but this chat template\'s default one is not where '
        "a probe conversation put it; set lm.system_prompt to a message of your own, or null",
    )
