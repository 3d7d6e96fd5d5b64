"""Tests for igpo_jax.data.tfds: questions from a prepared TFDS dataset, without TensorFlow.

The round-trip tests build tiny datasets on the fly (array_record, in a temporary data_dir, no
network) with the real `tensorflow_datasets` and read them back through `tfds.load_examples` (and
`components.load_examples`, a run's reader); the error tests also run on a fake `tensorflow_datasets` module, so they need no install.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from igpo_jax import components, config_base
from igpo_jax.data import examples as examples_lib
from igpo_jax.data import tfds as tfds_lib
from igpo_jax.data.tfds import TfdsSource


def _reference_row(i, split="train"):
    return {
        "data_source": "nq" if i % 2 else "hotpotqa",
        "prompt": [{"content": "You are a search agent.", "role": "system"},
                   {"content": f"Who wrote book {i}? (é, 漢字)", "role": "user"}],
        "ability": "search & question answering",
        "reward_model": {"ground_truth": f"Author {i}<|answer_split|>A. {i}", "style": "rule"},
        "extra_info": {"index": f"{split}_{i}", "split": split},
    }


def _flat_row(i):
    return {"question": f"What is the capital of country {i}?", "answers": [f"City {i}", f"C{i}"],
            "id": 100 + i, "source": "popqa"}


FLAT_FIELDS = (("question", "question"), ("golden_answers", "answers"), ("index", "id"))

# ---------------------------------------------------------------------------------------------
# Real TFDS: a dataset prepared on the fly


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")

    def build(class_name, features, splits):
        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                         disable_shuffling=True)  # records keep the order written

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(rows) for split, rows in splits.items()}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

        # skip_registration: the reader must find the dataset through its files, as a run would.
        builder_cls = types.new_class(
            class_name, (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True},
            lambda ns: ns.update(VERSION=tfds.core.Version("1.0.0"), _info=_info,
                                 _split_generators=_split_generators,
                                 _generate_examples=_generate_examples))
        builder_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()

    text = tfds.features.Text
    build("TinyReferenceQa", {
        "data_source": text(),
        "prompt": tfds.features.Sequence({"content": text(), "role": text()}),
        "ability": text(),
        "reward_model": {"ground_truth": text(), "style": text()},
        "extra_info": {"index": text(), "split": text()},
    }, {"train": [_reference_row(i) for i in range(7)],
        "test": [_reference_row(i, "test") for i in range(3)]})
    bad_answers = [_flat_row(i) for i in range(3)]
    bad_answers[1] = {**bad_answers[1], "answers": []}
    build("TinyFlatQa", {
        "question": text(), "answers": tfds.features.Sequence(text()),
        "id": tfds.features.Scalar(dtype=np.int64), "source": text(),
    }, {"train": [_flat_row(i) for i in range(5)], "bad": bad_answers})
    return str(data_dir)


def test_reference_layout_reads_the_same_examples_as_the_parquet_reader(tfds_data_dir, tmp_path):
    rows = [_reference_row(i) for i in range(7)]
    parquet = tmp_path / "train.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=examples_lib.PARQUET_SCHEMA), parquet)
    from_parquet = examples_lib.load_examples(parquet)

    from_tfds = tuple(tfds_lib.load_examples(TfdsSource("tiny_reference_qa:1.0.0", "train", tfds_data_dir)))
    assert from_tfds == from_parquet
    assert from_tfds[0].question == "Who wrote book 0? (é, 漢字)"
    assert from_tfds[3].golden_answers == ("Author 3", "A. 3")
    assert from_tfds[3].prompt[0] == examples_lib.Message("system", "You are a search agent.")
    # Split slicing is TFDS's; a list of sources concatenates like a list of files.
    both = components.load_examples((TfdsSource("tiny_reference_qa", "train[:2]", tfds_data_dir),
                                     TfdsSource("tiny_reference_qa", "test", tfds_data_dir)))
    assert [e.index for e in both] == ["train_0", "train_1", "test_0", "test_1", "test_2"]
    assert "tensorflow" not in sys.modules  # TFDS read it with numpy alone


def test_field_mapping_reads_a_flat_dataset(tfds_data_dir):
    examples = tuple(tfds_lib.load_examples(TfdsSource("tiny_flat_qa", "train", tfds_data_dir, FLAT_FIELDS)))
    expected = tuple(examples_lib.Example(
        index=str(100 + i), data_source="tiny_flat_qa", question=f"What is the capital of country {i}?",
        golden_answers=(f"City {i}", f"C{i}"),
        prompt=(examples_lib.Message("user", f"What is the capital of country {i}?"),), split="train")
        for i in range(5))
    assert examples == expected
    mapped_source = TfdsSource("tiny_flat_qa", "train[1:2]", tfds_data_dir,
                               FLAT_FIELDS + (("data_source", "source"),))
    assert tfds_lib.load_examples(mapped_source)[0].data_source == "popqa"


def test_a_config_names_the_dataset_instead_of_files(tfds_data_dir):
    config = config_base.base_config()
    config.data.tfds.name = "tiny_reference_qa"
    config.data.tfds.data_dir = tfds_data_dir
    config.data.tfds.test_split = "test"
    config_base.validate(config)
    files = components.data_files(config)
    assert [e.index for e in components.load_examples(files.train)] == [f"train_{i}" for i in range(7)]
    assert [e.index for e in components.load_examples(files.test, limit=2)] == ["test_0", "test_1"]

    config.data.tfds.name = "tiny_flat_qa"
    config.data.tfds.fields = "question=question, golden_answers=answers, index=id"
    config.data.tfds.test_split = ""
    config.data.test_files = "held_out.parquet"  # a TFDS train set with a parquet test set
    files = components.data_files(config)
    assert len(components.load_examples(files.train)) == 5 and files.test == ("held_out.parquet",)


def test_a_bad_record_names_dataset_split_row_field_and_feature(tfds_data_dir):
    with pytest.raises(examples_lib.DataError) as error:
        tfds_lib.load_examples(TfdsSource("tiny_flat_qa", "bad", tfds_data_dir, FLAT_FIELDS))
    assert (error.value.row, error.value.field) == (1, "golden_answers")
    assert str(error.value) == ("TFDS dataset 'tiny_flat_qa' split 'bad' in " + tfds_data_dir +
                                ", row 1, field 'golden_answers': empty ground truth "
                                "(TFDS feature 'answers')")


def test_a_wrong_mapping_names_the_missing_feature_and_the_features_there(tfds_data_dir):
    fields = (("question", "question"), ("golden_answers", "answer/text"))
    with pytest.raises(examples_lib.DataError, match=r"row 0, field 'golden_answers': TFDS feature 'answer' "
                                             r"not found \(the record's features: answers, id, "
                                             r"question, source\)"):
        tfds_lib.load_examples(TfdsSource("tiny_flat_qa", "train", tfds_data_dir, fields))


def test_a_missing_dataset_or_split_fails_naming_it(tfds_data_dir):
    with pytest.raises(examples_lib.DataError, match=r"TFDS dataset 'tiny_reference_qa' split 'validation'"
                                             r".*Unknown split 'validation'"):
        tfds_lib.load_examples(TfdsSource("tiny_reference_qa", "validation", tfds_data_dir))
    with pytest.raises(examples_lib.DataError, match=r"TFDS dataset 'no_such_qa' split 'train'.*cannot open"):
        tfds_lib.load_examples(TfdsSource("no_such_qa", "train", tfds_data_dir))


# ---------------------------------------------------------------------------------------------
# A fake tensorflow_datasets: the reader's conversions and errors, with or without TFDS installed


@pytest.fixture
def fake_tfds(monkeypatch):
    """Installs a fake `tensorflow_datasets` whose data_source serves `datasets[name][split]`."""
    datasets: dict[str, dict[str, list]] = {}
    module = types.ModuleType("tensorflow_datasets")

    def data_source(name, *, split, data_dir=None, download=True):
        assert download is False  # never a download (nor a TF-needing preparation) at train time
        return datasets[name][split]

    module.data_source = data_source
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    return datasets


def test_numpy_values_as_tfds_decodes_them_become_plain_examples(fake_tfds):
    fake_tfds["qa:1.0.0"] = {"train[:1]": [{
        "q": np.bytes_("Where is Paris?"),
        "a": np.array([b"France", "République française".encode()], dtype=object),
        "id": np.int64(7), "meta": {"src": b"tq"},
    }]}
    fields = (("question", "q"), ("golden_answers", "a"), ("index", "id"), ("data_source", "meta/src"))
    (example,) = tfds_lib.load_examples(TfdsSource("qa:1.0.0", "train[:1]", "", fields))
    assert example == examples_lib.Example(index="7", data_source="tq", question="Where is Paris?",
                                           golden_answers=("France", "République française"),
                                           prompt=(examples_lib.Message("user", "Where is Paris?"),), split="train")


@pytest.mark.parametrize("record, field, problem", [
    ({"q": b"\xff\xfe", "a": b"x"}, "question", "not valid UTF-8"),
    ({"q": b"  ", "a": b"x"}, "question", "empty"),
    ({"q": np.array([b"a", b"b"]), "a": b"x"}, "question", "expected a string, found list"),
    ({"q": b"Q?", "a": np.array([1, 2])}, "golden_answers", "expected strings"),
    ({"q": b"Q?", "a": b"x<|answer_split|> "}, "golden_answers", "empty alias"),
    ({"q": b"Q?", "a": np.float32(1.5)}, "golden_answers", "expected a string, found float"),
])
def test_bad_values_fail_naming_row_field_and_feature(fake_tfds, record, field, problem):
    good = {"q": b"Fine?", "a": b"yes"}
    fake_tfds["qa"] = {"train": [good, good, record]}
    source = TfdsSource("qa", "train", "", (("question", "q"), ("golden_answers", "a")))
    with pytest.raises(examples_lib.DataError) as error:
        tfds_lib.load_examples(source)
    assert (error.value.path, error.value.row, error.value.field) == \
        ("TFDS dataset 'qa' split 'train'", 2, field)
    assert problem in error.value.problem
    assert f"(TFDS feature '{dict(source.fields)[field]}')" in error.value.problem


def test_a_bad_prompt_message_is_named_by_its_position(fake_tfds):
    record = _reference_row(0)
    record["prompt"] = {"role": [b"system", b"user"], "content": [b"sys", 5]}
    fake_tfds["ref"] = {"train": [record]}
    with pytest.raises(examples_lib.DataError, match=r"row 0, field 'prompt\[1\]\.content': expected a string, "
                                             r"found int 5 \(TFDS feature 'prompt'\)"):
        tfds_lib.load_examples(TfdsSource("ref", "train"))


def test_an_empty_split_fails(fake_tfds):
    fake_tfds["qa"] = {"train": []}
    with pytest.raises(examples_lib.DataError, match="the split has no rows"):
        tfds_lib.load_examples(TfdsSource("qa", "train", "", FLAT_FIELDS))


def test_missing_tensorflow_datasets_says_which_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails as if absent
    with pytest.raises(ImportError, match=r"optional package 'tensorflow-datasets'.*"
                                          r"pip install tensorflow-datasets==4\.9\.10.*"
                                          r"TensorFlow itself is not needed"):
        tfds_lib.load_examples(TfdsSource("qa", "train"))


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("spec, message", [
    ("question", "is not 'example_field=tfds/feature/path'"),
    ("question=q", "'golden_answers' must be mapped"),
    ("golden_answers=a", "map exactly one of 'question' and 'prompt'"),
    ("question=q,prompt=p,golden_answers=a", "map exactly one of 'question' and 'prompt'"),
    ("question=q,golden_answers=a,answer=b", "unknown example field(s) answer"),
    ("question=q,golden_answers=a,question=r", "question mapped more than once"),
    ("question=q,golden_answers=a//b", "bad TFDS feature path 'a//b'"),
])
def test_bad_field_mappings_fail_at_config_validation(spec, message):
    config = config_base.base_config()
    config.data.tfds.name = "qa"
    config.data.tfds.fields = spec
    with pytest.raises(ValueError) as error:
        config_base.validate(config)
    assert "config.data.tfds.fields" in str(error.value) and message in str(error.value)


def test_tfds_and_files_cannot_both_name_the_training_data():
    config = config_base.base_config()
    config.data.tfds.name = "qa"
    config.data.train_files = "train.parquet"
    with pytest.raises(ValueError, match="config.data.tfds.name='qa' and config.data.train_files"):
        config_base.validate(config)
    config.data.train_files = ""
    config.data.tfds.test_split = "test"
    config.data.test_files = "test.parquet"
    with pytest.raises(ValueError, match="both name the test data"):
        config_base.validate(config)
