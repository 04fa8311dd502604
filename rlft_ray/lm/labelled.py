"""Labelled single-completion files: KTO's unpaired data and ILQL's reward table.

Both hold one completion per row, in TRL's unpaired field names: ``prompt``,
``completion`` (strings, or ``{role, content}`` message lists as in pair files) and a
label: ``label`` (bool: desirable or not) for KTO, ``reward`` (a finite number) for ILQL
(``rlft-ray sample`` writes such a table; there an empty completion is a model's
immediate EOS, a trajectory like any other). :func:`load_labelled` runs on the driver
before Ray starts and checks every row as :func:`~rlft_ray.lm.pairs.load_pairs` does
(missing fields and ill-typed values are errors naming the line; empty fields are errors
or, with ``lm.drop_invalid_pairs``, dropped and counted; over-long rows follow
``lm.pair_overflow``). The cleaned table has token ids, prompt left and completion
(ending with EOS) right, and the label as a float column ``value``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rlft_ray.config import LMConfig
from rlft_ray.lm.pairs import (
    PairStats,
    _empty,
    _text,
    completion_text,
    fit_to_limits,
    render_prompt_text,
)
from rlft_ray.lm.prompts import PromptDataError, read_records
from rlft_ray.types import pad_sequences
from rlft_ray.types.episodes import EpisodeStats

#: Columns of a prepared table.
COLUMNS = ("row_index", "prompt_ids", "completion_ids", "value")


@dataclass
class LabelledRows:
    """One rank's batch of prepared rows (a Ray Data batch or a table slice).

    Attributes:
        rows: Column name -> values (:data:`COLUMNS`). policy_version: The learner's version.
    """

    rows: Mapping[str, Any] | pd.DataFrame
    policy_version: int = 0

    def __len__(self) -> int:
        return len(self.rows["value"])

    @property
    def episodes(self) -> EpisodeStats:
        """Offline rows are no episodes."""
        return EpisodeStats()

    def counts(self) -> dict[str, float]:
        """What this batch holds, for ``perf/{name}_per_s`` (a row is an "env step")."""
        return {"env_steps": float(len(self)), "examples": float(len(self))}


def _label(value: Any, field: str, where: str, key: str) -> float:
    """A row's label as a float: ``label`` must be a bool, ``reward`` a finite number."""
    if isinstance(value, np.generic):
        value = value.item()
    if field == "label":
        if not isinstance(value, bool):
            raise PromptDataError(
                key,
                f"{where}: 'label' must be true or false, got {value!r} ({type(value).__name__})",
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PromptDataError(key, f"{where}: 'reward' must be a finite number, got {value!r}")
    return float(value)


def load_labelled(
    path: str | Path, tokenizer: Any, lm: LMConfig, key: str, field: str
) -> tuple[pd.DataFrame, PairStats]:
    """Read, validate and tokenize a labelled file (``field``: ``label`` or ``reward``).

    Returns:
        ``(table, stats)``: :data:`COLUMNS`, and the decisions counted as for pairs.

    Raises:
        PromptDataError: Naming ``key``, the file and the line at fault.
    """
    what = "unpaired" if field == "label" else "reward-labelled"
    rows, lines = read_records(path, key, what=what)
    if not rows:
        raise PromptDataError(key, f"{path} holds no rows (empty file)")
    fields = ("prompt", "completion", field)
    eos = tokenizer.eos_token_id
    out: list[dict[str, Any]] = []
    invalid = overlong = truncated = 0
    for index, (row, line) in enumerate(zip(rows, lines)):
        where = f"{path}:{line}"
        missing = [f for f in fields if row.get(f) is None]
        if missing:
            raise PromptDataError(
                key, f"{where}: missing field(s) {missing} (needs {list(fields)})"
            )
        prompt, completion = (_text(row[f], f, where, key) for f in fields[:2])
        value = _label(row[field], field, where, key)
        # an empty completion is a trajectory of one EOS for ILQL, but no example for KTO
        checked = (prompt, completion) if field == "label" else (prompt,)
        empty = next((f for f, v in zip(fields, checked) if _empty(v)), None)
        if empty:
            if not lm.drop_invalid_pairs:
                raise PromptDataError(
                    key, f"{where}: empty {empty!r}; fix the file or set lm.drop_invalid_pairs=true"
                )
            invalid += 1
            continue
        text = render_prompt_text(prompt, tokenizer, where, key)
        p_ids = list(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])
        c_ids = [
            *tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"],
            eos,
        ]
        fitted = fit_to_limits(p_ids, [c_ids], lm, where, key)
        if fitted is None:
            overlong += 1
            continue
        p_ids, (c_ids,), was_truncated = fitted
        truncated += was_truncated
        out.append(
            {"row_index": index, "prompt_ids": p_ids, "completion_ids": c_ids, "value": value}
        )
    stats = PairStats(str(path), len(rows), len(out), invalid, overlong, truncated)
    if not out:
        raise PromptDataError(key, f"{path}: no rows left to use ({stats})")
    return pd.DataFrame(out, columns=list(COLUMNS)), stats


def labelled_tensors(
    rows: Mapping[str, Any] | pd.DataFrame,
    pad_id: int,
    device: torch.device,
    mismatch: bool = False,
) -> dict[str, torch.Tensor]:
    """Tensors of prepared rows: ``prompt_ids`` / ``prompt_mask`` ``[B, P]`` (left-padded),
    ``chosen_ids`` / ``chosen_mask`` ``[B, L]`` (each row's completion, right-padded: the
    key names the pair helpers share), ``value`` ``[B]``; with ``mismatch`` also
    ``rejected_ids`` / ``rejected_mask``: the completions rotated by one,
    (x_i, y_{i-1}), KTO's mismatched pairs for its KL estimate (TRL's order)."""
    if isinstance(rows, pd.DataFrame):
        rows = {c: rows[c].to_numpy() for c in rows.columns}
    prompts = [list(map(int, p)) for p in rows["prompt_ids"]]
    completions = [list(map(int, c)) for c in rows["completion_ids"]]
    p_ids, p_mask = pad_sequences(
        prompts, pad_id, "left", max((len(p) for p in prompts), default=1)
    )
    width = max((len(c) for c in completions), default=1)
    c_ids, c_mask = pad_sequences(completions, pad_id, "right", width)
    arrays = {
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "chosen_ids": c_ids,
        "chosen_mask": c_mask,
        "value": np.asarray(rows["value"], dtype=np.float32),
    }
    if mismatch:
        arrays["rejected_ids"] = np.roll(c_ids, 1, axis=0)
        arrays["rejected_mask"] = np.roll(c_mask, 1, axis=0)
    return {k: torch.tensor(v, device=device) for k, v in arrays.items()}
