"""Questions from a prepared TensorFlow Datasets (TFDS) dataset instead of parquet files.

Optional: nothing here imports `tensorflow_datasets` until a TFDS source is actually read, and
TensorFlow itself is never needed. TFDS ≥ 4.9 reads a prepared dataset (array_record files, as
written by `download_and_prepare(file_format='array_record')`) with `tfds.data_source`, which
decodes records with numpy only. Datasets prepared as TFRecord need TensorFlow to read and are
not supported here; re-prepare them as array_record.

A source is a dataset, a split and a mapping from the fields of `examples.Example` to TFDS feature
paths ('/' between nested feature names, as TFDS writes them):

  question        a string feature; becomes the prompt's single user message   } exactly
  prompt          a Sequence({role, content}) feature (the reference's prompt)   } one of these
  golden_answers  a string (aliases joined by '<|answer_split|>') or a Sequence of strings
  data_source     string; unmapped → the dataset's name
  ability         string; unmapped → examples.DEFAULT_ABILITY
  answer_style    string; unmapped → examples.DEFAULT_ANSWER_STYLE
  index           string or integer; unmapped → the row number within the split as read
  split           string; unmapped → the split's name (e.g. 'train' for 'train[:500]')

With no mapping the dataset must have the reference's own layout (IGPO_SPEC §6), feature for
column: data_source, prompt, ability, reward_model/{ground_truth, style}, extra_info/{index,
split}. Every record goes through the parquet reader's validation, so the examples are the same
objects, and a bad record fails with the dataset, the split, the row, the field and its feature.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from igpo_jax.data import examples as examples_lib

PIP_PACKAGE = "tensorflow-datasets"
PIP_HINT = f"pip install {PIP_PACKAGE}==4.9.10"  # the version the tests build and read datasets with

# Example field → the reference column (dotted for struct fields) that it fills.
FIELDS = {
    "question": "prompt",
    "prompt": "prompt",
    "golden_answers": "reward_model.ground_truth",
    "data_source": "data_source",
    "ability": "ability",
    "answer_style": "reward_model.style",
    "index": "extra_info.index",
    "split": "extra_info.split",
}

REFERENCE_LAYOUT = {
    "prompt": "prompt",
    "golden_answers": "reward_model/ground_truth",
    "answer_style": "reward_model/style",
    "data_source": "data_source",
    "ability": "ability",
    "index": "extra_info/index",
    "split": "extra_info/split",
}

_READ_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """One split of a prepared TFDS dataset; hashable, so it sits in `components.DataFiles`."""

    name: str  # 'name[/config][:version]', as tfds.data_source takes it
    split: str  # TFDS split syntax: 'train', 'test[:500]', 'train[:90%]', …
    data_dir: str = ""  # '' → TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    fields: tuple[tuple[str, str], ...] = ()  # (Example field, TFDS feature path); () → reference layout

    def __post_init__(self):
        if not self.name:
            raise ValueError("TfdsSource: empty dataset name")
        if not self.split:
            raise ValueError(f"TfdsSource {self.name!r}: empty split")
        check_fields(dict(self.fields) if self.fields else REFERENCE_LAYOUT)

    @property
    def label(self) -> str:
        """How errors name the source (the `path` of a `examples.DataError`)."""
        where = f" in {self.data_dir}" if self.data_dir else ""
        return f"TFDS dataset '{self.name}' split '{self.split}'{where}"

    def mapping(self) -> dict[str, str]:
        return dict(self.fields) if self.fields else dict(REFERENCE_LAYOUT)

    def __str__(self) -> str:
        return f"tfds:{self.name}[{self.split}]"


def parse_fields(spec: str, key: str = "data.tfds.fields") -> tuple[tuple[str, str], ...]:
    """'question=question,golden_answers=answers/text' → (('question', 'question'), …); '' → ()."""
    pairs = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        field, sep, feature = (s.strip() for s in item.partition("="))
        if not sep or not field or not feature:
            raise ValueError(f"config.{key}: {item!r} is not 'example_field=tfds/feature/path'")
        pairs.append((field, feature))
    fields = [f for f, _ in pairs]
    duplicates = sorted({f for f in fields if fields.count(f) > 1})
    if duplicates:
        raise ValueError(f"config.{key}: {', '.join(duplicates)} mapped more than once")
    if pairs:
        try:
            check_fields(dict(pairs))
        except ValueError as e:
            raise ValueError(f"config.{key}: {e}") from None
    return tuple(pairs)


def check_fields(mapping: Mapping[str, str]) -> None:
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown example field(s) {', '.join(unknown)}; "
                         f"the fields are {', '.join(FIELDS)}")
    if ("question" in mapping) == ("prompt" in mapping):
        raise ValueError("map exactly one of 'question' and 'prompt'")
    if "golden_answers" not in mapping:
        raise ValueError("'golden_answers' must be mapped")
    for field, feature in mapping.items():
        if not feature or any(not part for part in feature.split("/")):
            raise ValueError(f"field '{field}': bad TFDS feature path {feature!r}")


def sources_from_config(tfds_config: Any) -> tuple[tuple[TfdsSource, ...], tuple[TfdsSource, ...]]:
    """(train, test) sources from `config.data.tfds`; test is () when no test split is named."""
    fields = parse_fields(tfds_config.fields)
    make = lambda split: (TfdsSource(tfds_config.name, split, tfds_config.data_dir, fields),)
    return (make(tfds_config.train_split) if tfds_config.train_split else (),
            make(tfds_config.test_split) if tfds_config.test_split else ())


def import_tfds():
    """`tensorflow_datasets`, or an ImportError that says which pip package to install."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        if e.name == "tensorflow_datasets":
            raise ImportError(
                f"reading a TFDS dataset needs the optional package '{PIP_PACKAGE}', which is not "
                f"installed: {PIP_HINT}  (TensorFlow itself is not needed)") from e
        raise ImportError(f"'{PIP_PACKAGE}' is installed but failed to import ({e}); "
                          f"reinstall it: {PIP_HINT}") from e
    return tfds


def load_examples(source: TfdsSource) -> list[examples_lib.Example]:
    """Reads and validates every record of the source's split, in the split's order."""
    tfds = import_tfds()
    data_dir = os.path.expanduser(source.data_dir) if source.data_dir else None
    try:
        records = tfds.data_source(source.name, split=source.split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises many types; all mean "cannot open"
        raise examples_lib.DataError(source.label, None, None,
                                     f"cannot open it ({type(e).__name__}: {_short(e)}); it must be "
                                     f"prepared (array_record) under the data_dir") from e
    num_rows = len(records)
    if num_rows == 0:
        raise examples_lib.DataError(source.label, None, None, "the split has no rows")
    getitems = getattr(records, "__getitems__", None)
    mapping = source.mapping()
    examples = []
    for start in range(0, num_rows, _READ_CHUNK):
        rows = range(start, min(start + _READ_CHUNK, num_rows))
        try:
            chunk = getitems(list(rows)) if getitems else [records[i] for i in rows]
        except Exception as e:
            raise examples_lib.DataError(source.label, None, None, f"cannot read rows {rows.start}–"
                                         f"{rows.stop - 1} ({type(e).__name__}: {_short(e)})") from e
        examples.extend(_example(source, mapping, row, record) for row, record in zip(rows, chunk))
    return examples


def _example(source: TfdsSource, mapping: dict[str, str], row: int, record: Any) -> examples_lib.Example:
    def fail(field: str, problem: str) -> examples_lib.DataError:
        base = field.split("[")[0]
        suffix = f" (TFDS feature '{mapping[base]}')" if base in mapping else ""
        return examples_lib.DataError(source.label, row, field, problem + suffix)

    if not isinstance(record, Mapping):
        raise examples_lib.DataError(source.label, row, None,
                                     f"expected a record of features, found {type(record).__name__}")

    values = {field: _normalise(_feature(source, record, row, field, feature), lambda p, f=field: fail(f, p))
              for field, feature in mapping.items()}

    if "question" in values:
        question = values["question"]
        if isinstance(question, str) and not question.strip():
            raise fail("question", "empty")
        prompt = [{"role": "user", "content": question}]
    else:
        prompt = _messages(values["prompt"])

    answers = values["golden_answers"]
    if isinstance(answers, list):
        if not all(isinstance(a, str) for a in answers):
            raise fail("golden_answers", f"expected strings, found {answers!r:.80}")
        answers = examples_lib.ANSWER_SEPARATOR.join(answers)

    reference_row = {
        "data_source": values.get("data_source", _base_name(source.name)),
        "prompt": prompt,
        "ability": values.get("ability", examples_lib.DEFAULT_ABILITY),
        "reward_model": {"ground_truth": answers,
                         "style": values.get("answer_style", examples_lib.DEFAULT_ANSWER_STYLE)},
        "extra_info": {"index": values.get("index", row), "split": values.get("split", _split_name(source.split))},
    }
    try:
        return examples_lib.parse_row(source.label, row, reference_row)
    except examples_lib.DataError as e:
        field, rest = _example_field(e.field, "question" if "question" in values else "prompt")
        raise fail(field + rest, e.problem) from None


def _feature(source: TfdsSource, record: Mapping, row: int, field: str, path: str) -> Any:
    value: Any = record
    for depth, part in enumerate(path.split("/")):
        if not isinstance(value, Mapping) or part not in value:
            known = ", ".join(sorted(_feature_paths(record))) or "none"
            missing = "/".join(path.split("/")[:depth + 1])
            raise examples_lib.DataError(source.label, row, field,
                                         f"TFDS feature '{missing}' not found (the record's features: {known})")
        value = value[part]
    return value


def _feature_paths(record: Mapping, prefix: str = "") -> list[str]:
    paths = []
    for key, value in record.items():
        path = f"{prefix}{key}"
        paths.extend(_feature_paths(value, path + "/") if isinstance(value, Mapping) else [path])
    return paths


def _normalise(value: Any, fail) -> Any:
    """TFDS numpy values → the plain Python values the parquet reader sees (bytes → str, …)."""
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise fail(f"not valid UTF-8 ({e.reason} at byte {e.start}): {bytes(value)!r:.60}") from None
    if isinstance(value, np.ndarray):
        return [_normalise(v, fail) for v in value.tolist()] if value.ndim else _normalise(value.item(), fail)
    if isinstance(value, (list, tuple)):
        return [_normalise(v, fail) for v in value]
    if isinstance(value, Mapping):
        return {k: _normalise(v, fail) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _messages(prompt: Any) -> Any:
    """A TFDS Sequence({role, content}) decodes as {role: [...], content: [...]}: transposed here."""
    if (isinstance(prompt, dict) and set(prompt) == {"role", "content"}
            and all(isinstance(v, list) for v in prompt.values())
            and len(prompt["role"]) == len(prompt["content"])):
        return [{"role": r, "content": c} for r, c in zip(prompt["role"], prompt["content"])]
    return prompt


def _example_field(reference_field: str | None, prompt_field: str) -> tuple[str, str]:
    """A reference column named in a parser error → (the Example field, the rest of the path)."""
    reference_field = reference_field or ""
    for field, column in FIELDS.items():
        if field in ("question", "prompt"):
            continue
        if reference_field == column:
            return field, ""
    if reference_field.startswith("prompt"):
        return prompt_field, reference_field[len("prompt"):] if prompt_field == "prompt" else ""
    return reference_field, ""


def _base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def _split_name(split: str) -> str:
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()


def _short(error: Exception, limit: int = 600) -> str:
    """TFDS's not-found errors list every dataset it knows; keep the lines that say what is wrong."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    keep = lines[:1] + [l for l in lines[1:] if l.startswith(_TELLING_LINES)]
    text = " ".join(keep)
    return text if len(text) <= limit else text[:limit] + "…"


_TELLING_LINES = ("Did you mean", "The builder directory", "No builder", "No version", "However",
                  "Possible root causes", "*")
