"""Prompt files: reading, validation, and the rows each learner rank reads.

A prompt file is ``.jsonl`` (one JSON object per line), ``.json`` (a list of
objects) or ``.parquet`` with a ``prompt`` column (``lm.prompt_key``) and any
metadata columns; ``answer`` (or ``ground_truth``, copied to ``answer`` when
``answer`` is absent) is what the arithmetic rewards compare against.

:func:`load_prompts` runs on the driver before Ray starts: it tokenizes every
prompt once, drops or fails on empty and over-long prompts as configured, and
counts each decision (:class:`PromptStats`). The cleaned table (columns
``prompt``, ``prompt_ids``, ``metadata`` as JSON) is sharded over the learner ranks, in
memory (:class:`TableShard`) or, when large, as a Ray Dataset Ray Train shards;
:func:`prompts_from_batch` turns a batch of it back into
:class:`~rlft_ray.types.Prompt` objects, and a :class:`PromptStream` hands a learner
rank endless epochs of its shard.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlft_ray.config import ConfigError, LMConfig
from rlft_ray.lm.chat import render_chat
from rlft_ray.types import Prompt

SUFFIXES = (".jsonl", ".json", ".parquet")
_SHOW_ROWS = 5


class PromptDataError(ConfigError):
    """A prompt file is missing, unreadable, or holds prompts the config does not allow."""


@dataclass(frozen=True)
class PromptStats:
    """What :func:`load_prompts` did with each row of a prompt file.

    Attributes:
        source: The file read.
        total: Rows in the file.
        kept: Prompts kept for training.
        empty_dropped: Empty prompts dropped (``lm.drop_empty_prompts``).
        overlong_dropped: Prompts over ``lm.max_prompt_tokens`` dropped.
        truncated: Prompts over the limit that were truncated instead.
        max_tokens: Longest kept prompt, in tokens.
        longest_overlong: Longest prompt over the limit, in tokens (0: none was).
    """

    source: str
    total: int
    kept: int
    empty_dropped: int = 0
    overlong_dropped: int = 0
    truncated: int = 0
    max_tokens: int = 0
    longest_overlong: int = 0

    def as_dict(self, prefix: str = "data/") -> dict[str, Any]:
        """Flat ``data/...`` entries for ``summary.json``."""
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for the console."""
        parts = [f"{self.kept}/{self.total} prompts kept from {self.source}"]
        for name, n in (
            ("empty dropped", self.empty_dropped),
            ("over-long dropped", self.overlong_dropped),
            ("over-long truncated", self.truncated),
        ):
            if n:
                parts.append(f"{n} {name}")
        if self.longest_overlong:
            parts.append(f"the longest has {self.longest_overlong} tokens")
        return ", ".join(parts)


def read_records(
    path: str | Path, key: str = "lm.prompts", what: str = "prompt"
) -> tuple[list[dict], list[int]]:
    """The rows of a ``.jsonl`` / ``.json`` / ``.parquet`` file and where each one is.

    Values are kept as written (an ``answer`` of ``"19"`` stays a string, an integer
    column with a missing value stays integers and None).

    Returns:
        ``(rows, lines)``: one dict per row, and its 1-based line in a ``.jsonl`` file
        (blank lines are skipped but counted) or its 1-based row number otherwise.

    Raises:
        PromptDataError: Missing file, unknown suffix, or unparsable content (naming
            the config key, the file and the line).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptDataError(key, f"{what} file not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptDataError(
            key,
            f"{p}: unsupported {what} file type {suffix!r}; use one of {', '.join(SUFFIXES)}",
        )
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(p).to_pylist()  # as written: no pandas float/NaN coercion
            return rows, list(range(1, len(rows) + 1))
        if suffix == ".jsonl":
            rows, lines = [], []
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PromptDataError(key, f"{p}:{n} is not valid JSON: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise PromptDataError(
                        key, f"{p}:{n} must be a JSON object, got {type(row).__name__}"
                    )
                rows.append(row)
                lines.append(n)
            return rows, lines
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise PromptDataError(key, f"{p} must hold a JSON list of objects")
        return data, list(range(1, len(data) + 1))
    except PromptDataError:
        raise
    except Exception as exc:  # pyarrow / json errors: name the file
        raise PromptDataError(key, f"cannot read {p}: {type(exc).__name__}: {exc}") from exc


def read_prompt_table(path: str | Path, key: str = "lm.prompts") -> pd.DataFrame:
    """Read a ``.jsonl`` / ``.json`` / ``.parquet`` prompt file into a DataFrame of Python
    objects: values stay as written (an integer answer stays an integer even when another
    row lacks one; a missing value is None, never NaN), and ``table.attrs["lines"]`` holds
    each row's line in the file.

    Raises:
        PromptDataError: See :func:`read_records`; also an empty file.
    """
    p = Path(path).expanduser()
    rows, lines = read_records(p, key)
    if not rows:
        raise PromptDataError(key, f"{p} is empty: no prompts to read")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pd.DataFrame(
        [[row.get(c) for c in columns] for row in rows], columns=columns, dtype=object
    )
    table.attrs["lines"] = lines
    return table


def render_prompt(
    value: Any,
    tokenizer: Any,
    chat_template: bool,
    system_prompt: str | None,
    prompt_template: str | None = None,
) -> str:
    """The prompt as the model sees it: a string verbatim (or as one user turn through the
    chat template), a conversation (a list of ``{"role", "content"}`` messages) always
    through the tokenizer's chat template (:func:`~rlft_ray.lm.chat.render_chat`, which
    applies ``lm.system_prompt``). A string is first put in ``prompt_template``'s
    ``{prompt}`` (``lm.prompt_template``); a conversation is left as it is.

    Raises:
        ConfigError: A conversation or ``lm.chat_template`` without a tokenizer template,
            or a message without ``role`` / ``content``.
    """
    if isinstance(value, np.ndarray):  # a list column read back from parquet
        value = value.tolist()
    conversation = isinstance(value, list)
    if not conversation and prompt_template is not None:
        value = prompt_template.format(prompt=str(value))
    if not conversation and not chat_template:
        return str(value)
    if getattr(tokenizer, "chat_template", None) is None:
        what = (
            "conversational prompts (lists of messages) need"
            if conversation
            else "lm.chat_template=true needs"
        )
        raise ConfigError(
            "lm.chat_template", f"{what} a tokenizer with a chat template; this one has none"
        )
    if conversation:
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            raise ConfigError(
                "lm.prompts", "a conversational prompt must be a list of {role, content} messages"
            )
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    else:
        messages = [{"role": "user", "content": str(value)}]
    return render_chat(tokenizer, messages, system_prompt)


def encode_prompt(text: str, tokenizer: Any, chat_template: bool) -> list[int]:
    """Token ids of a rendered prompt (special tokens are the chat template's job when it is on)."""
    return list(tokenizer(text, add_special_tokens=not chat_template)["input_ids"])


def _is_empty(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    if isinstance(value, (list, np.ndarray)):
        return len(value) == 0
    return not str(value).strip()


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> JSON-able python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _rows_list(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:_SHOW_ROWS])
    return shown + (f" and {len(rows) - _SHOW_ROWS} more" if len(rows) > _SHOW_ROWS else "")


def _check_table(table: pd.DataFrame, lm: LMConfig, source: str, key: str) -> None:
    """A prompt table has rows and the prompt column."""
    if len(table) == 0:
        raise PromptDataError(key, f"{source} is empty: no prompts to read")
    if lm.prompt_key not in table.columns:
        cols = ", ".join(map(str, table.columns))
        raise PromptDataError(
            key, f"{source} has no {lm.prompt_key!r} column (columns: {cols}); set lm.prompt_key"
        )


def prepare_prompts(
    table: pd.DataFrame, tokenizer: Any, lm: LMConfig, source: str, key: str = "lm.prompts"
) -> tuple[pd.DataFrame, PromptStats]:
    """Validate, render, tokenize and (per ``lm.prompt_overflow``) drop or truncate prompts.

    Args:
        table: Rows read by :func:`read_prompt_table`.
        tokenizer: The run's tokenizer.
        lm: The ``lm`` config section (prompt key, chat template, limits, policies).
        source: File name used in messages.
        key: Config key named in errors.

    Returns:
        ``(clean, stats)`` where ``clean`` has columns ``prompt`` (rendered text),
        ``prompt_ids`` (list of ints), ``metadata`` (JSON object string) and ``templated``
        (whether a chat template rendered it).

    Raises:
        PromptDataError: No prompt column, empty prompts (unless dropped), over-long
            prompts with ``prompt_overflow=error``, or nothing left to train on. Row
            numbers in messages are 1-based lines of the file.
    """
    _check_table(table, lm, source, key)
    records = table.to_dict(orient="records")
    lines = table.attrs.get("lines") or list(range(1, len(records) + 1))
    empty = [lines[i] for i, r in enumerate(records) if _is_empty(r[lm.prompt_key])]
    if empty and not lm.drop_empty_prompts:
        raise PromptDataError(
            key,
            f"{source}: {len(empty)} empty prompt(s) at row(s) {_rows_list(empty)}; "
            "fix the file or set lm.drop_empty_prompts=true to drop them",
        )
    used = [(n, r) for n, r in zip(lines, records) if not _is_empty(r[lm.prompt_key])]
    _check_answers([r for _, r in used], [n for n, _ in used], source, key)
    out: list[dict[str, Any]] = []
    overlong: list[int] = []
    truncated = dropped_long = longest = 0
    for n, record in used:
        text, ids, templated = _render_and_encode(record[lm.prompt_key], tokenizer, lm)
        if len(ids) > lm.max_prompt_tokens:
            overlong.append(n)
            longest = max(longest, len(ids))
            if lm.prompt_overflow == "drop":
                dropped_long += 1
                continue
            if lm.prompt_overflow == "truncate":
                ids = ids[-lm.max_prompt_tokens :]
                text = tokenizer.decode(ids)
                truncated += 1
        meta = {str(k): _plain(v) for k, v in record.items() if k != lm.prompt_key}
        if meta.get("answer") is None and meta.get("ground_truth") is not None:
            meta["answer"] = meta["ground_truth"]
        row = {"prompt": text, "prompt_ids": ids, "metadata": json.dumps(meta, default=str)}
        out.append({**row, "templated": templated})
    if overlong and lm.prompt_overflow == "error":
        raise PromptDataError(
            key,
            f"{source}: {len(overlong)} prompt(s) longer than lm.max_prompt_tokens={lm.max_prompt_tokens} "
            f"at row(s) {_rows_list(overlong)}; raise the limit or set lm.prompt_overflow=drop|truncate",
        )
    stats = PromptStats(
        source=source,
        total=len(records),
        kept=len(out),
        empty_dropped=len(empty),
        overlong_dropped=dropped_long,
        truncated=truncated,
        max_tokens=max((len(r["prompt_ids"]) for r in out), default=0),
        longest_overlong=longest,
    )
    if not out:
        hint = (
            "; raise lm.max_prompt_tokens (a chat template adds its own tokens)" if longest else ""
        )
        raise PromptDataError(key, f"{source}: no prompts left to use ({stats.describe()}){hint}")
    return pd.DataFrame(out, columns=["prompt", "prompt_ids", "metadata", "templated"]), stats


def _render_and_encode(value: Any, tokenizer: Any, lm: LMConfig) -> tuple[str, list[int], bool]:
    """A prompt's text as the model sees it, its ids and whether it was templated (a chat
    template adds its own special tokens, so templated text is encoded without them)."""
    text = render_prompt(value, tokenizer, lm.chat_template, lm.system_prompt, lm.prompt_template)
    templated = lm.chat_template or isinstance(value, (list, np.ndarray))
    return text, encode_prompt(text, tokenizer, templated), templated


def _check_answers(records: list[dict], lines: list[int], source: str, key: str) -> None:
    """A file with answers has one on every row: a null would be compared as "None" and
    score every completion 0."""
    for column in ("answer", "ground_truth"):
        if not any(column in r for r in records):
            continue
        missing = [n for n, r in zip(lines, records) if _is_empty(r.get(column))]
        if missing:
            raise PromptDataError(
                key,
                f"{source}: {len(missing)} row(s) without {column!r} (null or missing) at "
                f"line(s) {_rows_list(missing)}; every row needs one for the reward to compare",
            )
        return


def load_prompts(
    path: str | Path, tokenizer: Any, lm: LMConfig, key: str = "lm.prompts"
) -> tuple[pd.DataFrame, PromptStats]:
    """:func:`read_prompt_table` then :func:`prepare_prompts`."""
    table = read_prompt_table(path, key)
    return prepare_prompts(table, tokenizer, lm, str(path), key)


def prompts_from_batch(batch: Mapping[str, Any] | pd.DataFrame) -> list[Prompt]:
    """Rows of a prepared table (a Ray Data numpy/pandas batch) as :class:`Prompt` objects
    (a table without a ``templated`` column: none was templated)."""
    if isinstance(batch, pd.DataFrame):
        batch = {c: batch[c].to_numpy() for c in batch.columns}
    templated = batch["templated"] if "templated" in batch else [False] * len(batch["prompt"])
    return [
        Prompt(
            text=str(text), ids=[int(t) for t in ids], metadata=json.loads(meta), templated=bool(t)
        )
        for text, ids, meta, t in zip(
            batch["prompt"], batch["prompt_ids"], batch["metadata"], templated
        )
    ]


class TableShard:
    """One rank's share of a table held in memory, with the ``iter_batches`` interface
    of a Ray Data shard.

    Every rank orders the whole table the same way (same shuffle seed) and takes its
    slice of each global batch of ``batch_size * world`` rows, so the ranks' batches at
    step t together are exactly the batch one learner takes at step t: N DDP learners
    follow one learner's curve on the same global batch. Tables that fit in memory
    (prompt and pair files) travel to the learners this way: no Ray Data actors to
    start, which is most of a small run's start-up.
    """

    def __init__(self, table: pd.DataFrame, rank: int = 0, world: int = 1) -> None:
        self.table, self.rank, self.world = table.reset_index(drop=True), rank, world

    def iter_batches(
        self,
        batch_size: int,
        drop_last: bool = True,
        local_shuffle_buffer_size: int | None = None,
        local_shuffle_seed: int | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """This rank's ``batch_size`` rows of each global batch, the table shuffled
        (whole, the same on every rank) when a buffer size is given."""
        table = self.table
        if local_shuffle_buffer_size is not None:
            order = np.random.default_rng(local_shuffle_seed).permutation(len(table))
            table = table.iloc[order]
        # columns as arrays once per epoch: slicing pandas rows per batch costs about a
        # millisecond, on the learner's thread, every iteration
        columns = {c: table[c].to_numpy() for c in table.columns}
        step = batch_size * self.world
        stop = len(table) - step + 1 if drop_last else len(table)
        for start in range(0, max(stop, 0), step):
            first = start + self.rank * batch_size
            if first < len(table):
                yield {c: v[first : first + batch_size] for c, v in columns.items()}


class ShardStream:
    """Endless batches of rows from this rank's Ray Data shard, reshuffled every epoch.

    Args:
        shard: ``DataIterator`` (or anything with ``iter_batches``) over a prepared table.
        batch_size: Rows per :meth:`next_rows` call (this rank's share of an iteration).
        seed: Shuffle seed (epoch ``e`` uses ``seed + e``); the same on every rank, so
            in-memory tables (:class:`TableShard`) give the ranks one global order.
        shuffle: Shuffle within a local buffer each epoch.
    """

    def __init__(self, shard: Any, batch_size: int, seed: int, shuffle: bool) -> None:
        self.shard, self.batch_size, self.seed, self.shuffle = shard, batch_size, seed, shuffle
        self.epoch = 0
        self.taken = 0  # batches of this epoch handed out
        self._it: Iterator[Any] | None = None

    def state(self) -> dict[str, np.ndarray]:
        """Where the stream is (saved with a checkpoint, so ``--resume`` goes on from there)."""
        return {"stream_epoch": np.array(self.epoch), "stream_taken": np.array(self.taken)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Go on from :meth:`state`: the same epoch's shuffle, past the batches already taken."""
        self.epoch, skip = int(state["stream_epoch"]), int(state["stream_taken"])
        self._it = self._epoch_iter()
        self.taken = 0
        for _ in range(skip):
            if next(self._it, None) is None:
                break
            self.taken += 1

    def _epoch_iter(self) -> Iterator[Any]:
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "drop_last": True}
        if self.shuffle:
            kwargs.update(
                local_shuffle_buffer_size=max(4 * self.batch_size, 1024),
                local_shuffle_seed=self.seed + self.epoch,
            )
        return iter(self.shard.iter_batches(**kwargs))

    def next_rows(self) -> Mapping[str, Any]:
        """The next ``batch_size`` rows (a new epoch starts when the shard runs out)."""
        if self.shard is None:
            raise RuntimeError("this learner got no dataset shard (LearnerContext.datasets)")
        for fresh in (False, True):
            if self._it is None or fresh:
                if fresh:
                    self.epoch += 1
                self._it, self.taken = self._epoch_iter(), 0
            batch = next(self._it, None)
            if batch is not None:
                self.taken += 1
                return batch
        raise RuntimeError(f"this rank's shard holds fewer than {self.batch_size} rows")


class PromptStream(ShardStream):
    """A :class:`ShardStream` of prompts: :meth:`next` gives :class:`~rlft_ray.types.Prompt` s."""

    def next(self) -> list[Prompt]:
        """The next ``batch_size`` prompts."""
        return prompts_from_batch(self.next_rows())
