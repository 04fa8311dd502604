"""Preference pair files: reading, validation, tokenization, and the batches learners use.

A pair file is ``.jsonl`` / ``.json`` / ``.parquet`` with TRL's preference fields:
``prompt``, ``chosen``, ``rejected``, each a string, or (conversational) a list of
``{"role", "content"}`` messages: the prompt's go through the tokenizer's chat template
with the generation prompt, the completions' assistant contents are the answers.

:func:`load_pairs` runs on the driver before Ray starts: it checks every row (missing
fields and ill-typed values are errors naming the line; empty fields and chosen ==
rejected are errors too, or dropped and counted with ``lm.drop_invalid_pairs``),
tokenizes, and drops, truncates or refuses over-long pairs (``lm.pair_overflow``),
counting each decision (:class:`PairStats`). The cleaned table (token id columns) is
sharded over the learner ranks like a prompt table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rlft_ray.config import LMConfig
from rlft_ray.lm.prompts import PromptDataError, read_records
from rlft_ray.types import PairBatch, pad_sequences

FIELDS = ("prompt", "chosen", "rejected")
#: Columns of a prepared pair table.
COLUMNS = ("pair_index", "prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class PairStats:
    """What :func:`load_pairs` did with each row of a pair file.

    Attributes:
        source: The file read. total: Rows in it. kept: Pairs kept.
        invalid_dropped: Pairs with an empty field or chosen == rejected, dropped.
        overlong_dropped: Pairs over the length limits, dropped.
        truncated: Pairs over the limits that were truncated instead.
    """

    source: str
    total: int
    kept: int
    invalid_dropped: int = 0
    overlong_dropped: int = 0
    truncated: int = 0

    def as_dict(self, prefix: str = "pairs/") -> dict[str, Any]:
        """Flat ``pairs/...`` entries for ``summary.json``."""
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def _text(value: Any, field: str, where: str, key: str) -> str | list[dict]:
    """A field's value: a string, or a list of ``{role, content}`` messages."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, Mapping) and "role" in m and isinstance(m.get("content"), str) for m in value
    ):
        return [dict(m) for m in value]
    raise PromptDataError(
        key,
        f"{where}: {field!r} must be a string or a list of {{role, content}} messages, "
        f"got {type(value).__name__}",
    )


def render_prompt_text(prompt: str | list[dict], tokenizer: Any, where: str, key: str) -> str:
    """A prompt as the model sees it: a string verbatim, messages through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptDataError(
            key, f"{where}: a conversational prompt needs a tokenizer with a chat template"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def completion_text(completion: str | list[dict]) -> str:
    """A completion's text: a string verbatim, else its assistant messages' contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m["role"] == "assistant")


def _empty(value: str | list[dict]) -> bool:
    text = "".join(m["content"] for m in value) if isinstance(value, list) else value
    return not text.strip()


def load_pairs(
    path: str | Path, tokenizer: Any, lm: LMConfig, key: str = "lm.pairs"
) -> tuple[pd.DataFrame, PairStats]:
    """Read, validate and tokenize a pair file (see the module docstring).

    Returns:
        ``(table, stats)``; ``table`` has :data:`COLUMNS` (token ids as lists; the
        completions end with EOS).

    Raises:
        PromptDataError: Naming ``key``, the file and the line at fault.
    """
    rows, lines = read_records(path, key, what="pair")
    if not rows:
        raise PromptDataError(key, f"{path} holds no pairs (empty file)")
    eos = tokenizer.eos_token_id
    out: list[dict[str, Any]] = []
    invalid = overlong = truncated = 0
    for index, (row, line) in enumerate(zip(rows, lines)):
        where = f"{path}:{line}"
        missing = [f for f in FIELDS if row.get(f) is None]
        if missing:
            raise PromptDataError(
                key, f"{where}: missing field(s) {missing} (needs {list(FIELDS)})"
            )
        prompt, chosen, rejected = (_text(row[f], f, where, key) for f in FIELDS)
        problem = _invalid(prompt, chosen, rejected)
        if problem:
            if not lm.drop_invalid_pairs:
                raise PromptDataError(
                    key, f"{where}: {problem}; fix the file or set lm.drop_invalid_pairs=true"
                )
            invalid += 1
            continue
        p_ids, c_ids, r_ids = _encode(prompt, chosen, rejected, tokenizer, eos, where, key)
        fitted = fit_to_limits(p_ids, [c_ids, r_ids], lm, where, key)
        if fitted is None:
            overlong += 1
            continue
        p_ids, (c_ids, r_ids), was_truncated = fitted
        truncated += was_truncated
        out.append(
            {"pair_index": index, "prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids}
        )
    stats = PairStats(str(path), len(rows), len(out), invalid, overlong, truncated)
    if not out:
        raise PromptDataError(key, f"{path}: no pairs left to use ({stats})")
    return pd.DataFrame(out, columns=list(COLUMNS)), stats


def fit_to_limits(
    prompt_ids: list[int], completions: list[list[int]], lm: LMConfig, where: str, key: str
) -> tuple[list[int], list[list[int]], bool] | None:
    """Apply ``lm.pair_overflow`` to one row's token ids (pairs, KTO and ILQL rows alike).

    A row is over-long when its prompt has more than ``lm.max_prompt_tokens`` tokens or
    any of its completions more than ``lm.max_completion_tokens``. ``error`` refuses it,
    ``drop`` drops it, ``truncate`` keeps the prompt's last and each completion's first
    tokens up to the limits.

    Args:
        prompt_ids: The rendered prompt's ids. completions: Each completion's ids (EOS last).
        lm: Limits and policy. where: ``file:line`` for errors. key: The config key at fault.

    Returns:
        ``(prompt_ids, completions, truncated)``, or None where the row is dropped.

    Raises:
        PromptDataError: Over-long under ``lm.pair_overflow: error``, naming ``where``.
    """
    too_long = len(prompt_ids) > lm.max_prompt_tokens or any(
        len(c) > lm.max_completion_tokens for c in completions
    )
    if not too_long:
        return prompt_ids, completions, False
    if lm.pair_overflow == "error":
        raise PromptDataError(
            key,
            f"{where}: longer than lm.max_prompt_tokens={lm.max_prompt_tokens} / "
            f"lm.max_completion_tokens={lm.max_completion_tokens}; raise the limits or set "
            "lm.pair_overflow=drop|truncate",
        )
    if lm.pair_overflow == "drop":
        return None
    kept = [c[: lm.max_completion_tokens] for c in completions]
    return prompt_ids[-lm.max_prompt_tokens :], kept, True


def _encode(
    prompt: Any, chosen: Any, rejected: Any, tokenizer: Any, eos: int, where: str, key: str
) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the rendered prompt and of both completions (each ending with EOS)."""
    text = render_prompt_text(prompt, tokenizer, where, key)
    # a chat template writes its own special tokens; a plain prompt gets the tokenizer's
    p_ids = list(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])
    c_ids, r_ids = (
        [*tokenizer(completion_text(x), add_special_tokens=False)["input_ids"], eos]
        for x in (chosen, rejected)
    )
    return p_ids, c_ids, r_ids


def _invalid(prompt: Any, chosen: Any, rejected: Any) -> str | None:
    """Why a pair carries no preference, or None."""
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if _empty(value):
            return f"empty {name!r}"
    if completion_text(chosen) == completion_text(rejected):
        return "'chosen' equals 'rejected' (no preference to learn)"
    return None


def pair_batch(rows: Mapping[str, Any] | pd.DataFrame, pad_id: int, version: int = 0) -> PairBatch:
    """A :class:`~rlft_ray.types.PairBatch` from prepared rows (a Ray Data batch or table).

    Prompts are left-padded, completions right-padded to the longest of chosen and
    rejected; ``ref_chosen`` / ``ref_rejected`` columns, when present, travel along.
    """
    if isinstance(rows, pd.DataFrame):
        rows = {c: rows[c].to_numpy() for c in rows.columns}
    prompts = [list(map(int, p)) for p in rows["prompt_ids"]]
    chosen = [list(map(int, c)) for c in rows["chosen_ids"]]
    rejected = [list(map(int, r)) for r in rows["rejected_ids"]]
    p_len = max((len(p) for p in prompts), default=1)
    r_len = max((len(x) for x in chosen + rejected), default=1)

    p_ids, p_mask = pad_sequences(prompts, pad_id, "left", p_len)
    c_ids, c_mask = pad_sequences(chosen, pad_id, "right", r_len)
    r_ids, r_mask = pad_sequences(rejected, pad_id, "right", r_len)
    has_ref = "ref_chosen" in rows
    return PairBatch(
        prompt_ids=p_ids,
        prompt_mask=p_mask,
        chosen_ids=c_ids,
        chosen_mask=c_mask,
        rejected_ids=r_ids,
        rejected_mask=r_mask,
        pad_token_id=pad_id,
        policy_version=version,
        ref_chosen=np.asarray(rows["ref_chosen"], dtype=np.float32) if has_ref else None,
        ref_rejected=np.asarray(rows["ref_rejected"], dtype=np.float32) if has_ref else None,
    )


PAIR_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "chosen_ids",
    "chosen_mask",
    "rejected_ids",
    "rejected_mask",
)


def pair_tensors(batch: PairBatch, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's arrays as tensors (copies: arrays from Ray's object store are read-only)."""
    t = {k: torch.tensor(getattr(batch, k), device=device) for k in PAIR_KEYS}
    if batch.ref_chosen is not None and batch.ref_rejected is not None:
        t["ref_chosen"] = torch.tensor(batch.ref_chosen, device=device)
        t["ref_rejected"] = torch.tensor(batch.ref_rejected, device=device)
    return t


def rows_of(t: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pairs ``idx``, with all-padding prompt columns (left) and completion columns (right) cut."""
    sub = {k: v[idx] for k, v in t.items()}
    if len(idx) == 0:
        return sub
    keep = int(sub["prompt_mask"].any(0).long().argmax())
    completions = sub["chosen_mask"]  # single-completion rows (KTO, ILQL) have no rejected
    if "rejected_mask" in sub:
        completions = completions | sub["rejected_mask"]
    width = int(completions.any(0).nonzero().max()) + 1 if completions.any() else 1
    sub["prompt_ids"], sub["prompt_mask"] = (
        sub["prompt_ids"][:, keep:],
        sub["prompt_mask"][:, keep:],
    )
    for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"):
        if k in sub:
            sub[k] = sub[k][:, :width]
    return sub


def padding_pair(t: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """One pair shaped like ``t``'s with a one-token prompt and one real completion token
    each (its weight is 0): what a rank without pairs in a minibatch runs."""
    dev = t["prompt_ids"].device
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=dev)
    ones = torch.ones((1, 1), dtype=torch.bool, device=dev)
    row = {
        "prompt_ids": ids,
        "prompt_mask": ones,
        "chosen_ids": ids,
        "chosen_mask": ones,
        "rejected_ids": ids,
        "rejected_mask": ones,
    }
    for k in ("ref_chosen", "ref_rejected"):
        if k in t:
            row[k] = torch.zeros(1, dtype=t[k].dtype, device=dev)
    return row
