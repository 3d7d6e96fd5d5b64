"""Question data: the reference's parquet format in and out, and a resumable batch iterator.

The format (IGPO_SPEC §6) is one row per question:
  data_source  str                                  benchmark name (nq, hotpotqa, …)
  prompt       list<struct<content: str, role: str>> chat; the question is the last user turn
  ability      str
  reward_model struct<ground_truth: str, style: str> aliases joined by '<|answer_split|>'
  extra_info   struct<index: str, split: str>
                     (+ supporting_doc_ids: list<str>, optional: the corpus documents that answer
                     the question, last = the one stating the answer; the synthetic world writes it)
Rows are validated when loaded, so that a bad file fails before any model is built, with a
message that names the file, the row and the field. A prepared TFDS dataset can stand in for
the files (`tfds`, optional): its reader imports this module and passes its records through the
same validation (`parse_row`); this module never imports it.

The iterator's whole state is a few integers (seed, epoch, position), so a checkpoint can
store it and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ANSWER_SEPARATOR = "<|answer_split|>"
DEFAULT_ABILITY = "search & question answering"
DEFAULT_ANSWER_STYLE = "unknown"

# Exactly the types of the reference's files (struct fields in their order there), so files we
# write are read unchanged by the reference's own loaders.
PARQUET_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([("index", pa.string()), ("split", pa.string())])),
])
REQUIRED_COLUMNS = tuple(PARQUET_SCHEMA.names)
# Files whose questions know their supporting documents (the synthetic world) add one field to
# extra_info; readers of the reference's format ignore extra_info fields they do not know.
_EXTRA_INFO_WITH_DOCS = pa.struct([("index", pa.string()), ("split", pa.string()),
                                   ("supporting_doc_ids", pa.list_(pa.string()))])
PARQUET_SCHEMA_WITH_DOCS = PARQUET_SCHEMA.set(4, pa.field("extra_info", _EXTRA_INFO_WITH_DOCS))

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A data file that cannot be used; says which file, row (0-based) and field."""

    def __init__(self, path: PathLike, row: int | None, field: str | None, problem: str):
        self.path = os.fspath(path)
        self.row = row  # None: the problem is the file's, not one row's
        self.field = field
        self.problem = problem
        where = [self.path, "all rows" if row is None else f"row {row}"]
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {problem}")


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class Example:
    """One question. `golden_answers[0]` is the alias scored for information gain."""

    index: str
    data_source: str
    question: str
    golden_answers: tuple[str, ...]
    prompt: tuple[Message, ...]
    split: str
    ability: str = DEFAULT_ABILITY
    answer_style: str = DEFAULT_ANSWER_STYLE
    # corpus ids of the documents that answer the question, in reading order (the last one states
    # the answer); () when the data does not say (every real benchmark file)
    supporting_doc_ids: tuple[str, ...] = ()

    def chat_messages(self) -> list[dict[str, str]]:
        """The prompt as the list of {role, content} dicts that chat templates take."""
        return [{"role": m.role, "content": m.content} for m in self.prompt]


def load_examples(paths: PathLike | Sequence[PathLike]) -> tuple[Example, ...]:
    """Reads and validates one parquet file or several (concatenated in the order given).

    TFDS splits are read by `tfds.load_examples`; `components.load_examples` takes a run's mix
    of both.
    """
    if isinstance(paths, (str, os.PathLike)):  # one file
        paths = [paths]
    if not paths:
        raise ValueError("load_examples: no data files given")
    examples: list[Example] = []
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"load_examples: {path!r} is not a file path "
                            f"(components.load_examples reads TFDS sources as well)")
        examples.extend(_load_file(path))
    return tuple(examples)


def _load_file(path: PathLike) -> list[Example]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {os.fspath(path)}")
    table = pq.read_table(path)
    for column in REQUIRED_COLUMNS:
        if column not in table.column_names:
            raise DataError(path, None, column,
                            f"column missing (the file has {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise DataError(path, None, None, "the file has no rows")
    table = table.select(list(REQUIRED_COLUMNS))
    return [parse_row(path, row_number, row)
            for row_number, row in enumerate(table.to_pylist())]


def parse_row(path: PathLike, row_number: int, row: dict[str, Any]) -> Example:
    """One row of the reference's format (a dict of its columns) as a validated Example; a
    problem raises a DataError naming `path`, the row and the field."""
    def fail(field: str, problem: str) -> DataError:
        return DataError(path, row_number, field, problem)

    def require_str(value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise fail(field, f"expected a string, found {_describe(value)}")
        return value

    def require_struct(value: Any, field: str, keys: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise fail(field, f"expected a struct with {', '.join(keys)}, found {_describe(value)}")
        for key in keys:
            if key not in value:
                raise fail(f"{field}.{key}", "missing")
        return value

    data_source = require_str(row["data_source"], "data_source")
    if not data_source:
        raise fail("data_source", "empty")
    ability = require_str(row["ability"], "ability")

    prompt_value = row["prompt"]
    if not isinstance(prompt_value, list):
        raise fail("prompt", f"expected a list of {{role, content}} messages, "
                             f"found {_describe(prompt_value)}")
    prompt = []
    for i, message in enumerate(prompt_value):
        message = require_struct(message, f"prompt[{i}]", ("role", "content"))
        prompt.append(Message(role=require_str(message["role"], f"prompt[{i}].role"),
                              content=require_str(message["content"], f"prompt[{i}].content")))
    user_turns = [m for m in prompt if m.role == "user"]
    if not user_turns:
        raise fail("prompt", f"no message with role 'user' "
                             f"(roles: {[m.role for m in prompt] or 'none'})")
    question = user_turns[-1].content
    if not question.strip():
        raise fail("prompt", "the last user message is empty")

    reward_model = require_struct(row["reward_model"], "reward_model", ("ground_truth", "style"))
    ground_truth = require_str(reward_model["ground_truth"], "reward_model.ground_truth")
    answer_style = require_str(reward_model["style"], "reward_model.style")
    if not ground_truth.strip():
        raise fail("reward_model.ground_truth", "empty ground truth")
    # An empty alias would score F1 = 0 against everything and, if first, break the
    # information-gain target; it is always a data bug, so it is rejected rather than dropped.
    golden_answers = tuple(alias.strip() for alias in ground_truth.split(ANSWER_SEPARATOR))
    if not all(golden_answers):
        raise fail("reward_model.ground_truth",
                   f"empty alias between '{ANSWER_SEPARATOR}' separators: {ground_truth!r}")

    extra_info = require_struct(row["extra_info"], "extra_info", ("index", "split"))
    index = extra_info["index"]
    # Search-R1's own files store the index as an integer; both mean the same row id.
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        index = str(index)
    index = require_str(index, "extra_info.index")
    split = require_str(extra_info["split"], "extra_info.split")
    doc_ids = extra_info.get("supporting_doc_ids") or ()
    if not isinstance(doc_ids, (list, tuple)) or not all(isinstance(d, str) and d for d in doc_ids):
        raise fail("extra_info.supporting_doc_ids", f"expected a list of non-empty strings, found {_describe(doc_ids)}")

    return Example(index=index, data_source=data_source, question=question,
                   golden_answers=golden_answers, prompt=tuple(prompt), split=split,
                   ability=ability, answer_style=answer_style, supporting_doc_ids=tuple(doc_ids))


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.60}"


def examples_to_table(examples: Sequence[Example]) -> pa.Table:
    """The reference's schema exactly, unless some example carries supporting_doc_ids (then
    PARQUET_SCHEMA_WITH_DOCS, whose extra_info has that one field more)."""
    with_docs = any(e.supporting_doc_ids for e in examples)
    rows = [{
        "data_source": e.data_source,
        "prompt": [{"content": m.content, "role": m.role} for m in e.prompt],
        "ability": e.ability,
        "reward_model": {"ground_truth": ANSWER_SEPARATOR.join(e.golden_answers),
                         "style": e.answer_style},
        "extra_info": {"index": e.index, "split": e.split,
                       **({"supporting_doc_ids": list(e.supporting_doc_ids)} if with_docs else {})},
    } for e in examples]
    return pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA_WITH_DOCS if with_docs else PARQUET_SCHEMA)


def write_examples(path: PathLike, examples: Sequence[Example]) -> None:
    """Writes examples in the reference's parquet format (read back unchanged by load_examples)."""
    pq.write_table(examples_to_table(examples), path)


# ---------------------------------------------------------------------------------------------
# Batches


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of example indices used in `epoch`.

    Built from an integer hash (splitmix64) rather than numpy's Generator, whose streams may
    change between numpy versions: a checkpoint must resume with the same order even after an
    upgrade.
    """
    epoch_key = _splitmix64(_splitmix64(np.array([seed], np.uint64)) ^ np.uint64(epoch))
    keys = _splitmix64(epoch_key + np.arange(num_examples, dtype=np.uint64))
    return np.argsort(keys, kind="stable")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Wrap-around uint64 arithmetic is the algorithm; numpy arrays wrap without warnings.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class BatchIterator:
    """Endless batches of `batch_size` examples, reshuffled every epoch.

    With `drop_remainder` (the default, as in the reference's trainer) every batch is full and
    the last `len(examples) % batch_size` examples of an epoch's order are skipped; without it
    the last batch of an epoch is shorter. `state()` / `restore()` carry the position across a
    checkpoint; a restored state's seed replaces the one given here. Every host of a multi-host
    run builds the same iterator and so sees the same global batches.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int,
                 shuffle: bool = True, drop_remainder: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not examples:
            raise ValueError("BatchIterator: no examples")
        if drop_remainder and batch_size > len(examples):
            raise ValueError(f"batch_size {batch_size} is larger than the data "
                             f"({len(examples)} examples) and drop_remainder is on")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self._examples = tuple(examples)
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._drop_remainder = drop_remainder
        self._seed = int(seed)
        self._epoch = 0
        self._position = 0  # examples of the current epoch's order already handed out
        self._order = self._order_for(0)

    @property
    def batches_per_epoch(self) -> int:
        full, remainder = divmod(len(self._examples), self._batch_size)
        return full + (1 if remainder and not self._drop_remainder else 0)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def questions_drawn(self) -> int:
        """Examples handed out since epoch 0 began (restored with the state: a resumed run counts on)."""
        per_epoch = self.batches_per_epoch * self._batch_size if self._drop_remainder else len(self._examples)
        return self._epoch * per_epoch + self._position

    def state(self) -> dict[str, int]:
        """Plain ints, so the dict goes into a JSON or orbax checkpoint as is."""
        return {"seed": self._seed, "epoch": self._epoch, "position": self._position,
                "num_examples": len(self._examples)}

    def restore(self, state: dict[str, int]) -> None:
        # A different data set under the same position would silently give other batches.
        if int(state["num_examples"]) != len(self._examples):
            raise ValueError(f"iterator state was saved with {state['num_examples']} examples, "
                             f"but the data now has {len(self._examples)}")
        position = int(state["position"])
        if not 0 <= position <= len(self._examples):
            raise ValueError(f"iterator state position {position} is outside the data")
        self._seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._position = position
        self._order = self._order_for(self._epoch)

    def __iter__(self) -> Iterator[tuple[Example, ...]]:
        return self

    def __next__(self) -> tuple[Example, ...]:
        remaining = len(self._examples) - self._position
        if remaining == 0 or (self._drop_remainder and remaining < self._batch_size):
            self._epoch += 1
            self._position = 0
            self._order = self._order_for(self._epoch)
        indices = self._order[self._position:self._position + self._batch_size]
        self._position += len(indices)
        return tuple(self._examples[i] for i in indices)

    def _order_for(self, epoch: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(len(self._examples))
        return epoch_order(len(self._examples), self._seed, epoch)


def evaluation_batches(examples: Sequence[Example],
                       batch_size: int) -> Iterator[tuple[Example, ...]]:
    """Every example once, in file order; the last batch may be shorter."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(examples), batch_size):
        yield tuple(examples[start:start + batch_size])
