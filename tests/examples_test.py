"""Tests for igpo_jax.data.examples: the parquet reader's validation and the resumable batch iterator."""

import json
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from igpo_jax.data import examples as examples_lib


def _row(i, question=None, ground_truth=None, prompt=None):
    return {
        "data_source": "nq",
        "prompt": prompt if prompt is not None else [
            {"content": question or f"Who wrote book {i}?", "role": "user"}],
        "ability": "search & question answering",
        "reward_model": {"ground_truth": ground_truth if ground_truth is not None
                         else f"Author {i}<|answer_split|>A. {i}", "style": "unknown"},
        "extra_info": {"index": f"nq_{i}", "split": "train"},
    }


def _write_rows(path, rows, schema=examples_lib.PARQUET_SCHEMA):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _examples(n):
    return tuple(examples_lib.Example(index=str(i), data_source="nq", question=f"q{i}",
                                      golden_answers=(f"a{i}",),
                                      prompt=(examples_lib.Message("user", f"q{i}"),), split="train")
                 for i in range(n))


# ---------------------------------------------------------------------------------------------
# Reader


def test_reads_the_reference_dev_file(reference_dev_file):
    examples = examples_lib.load_examples(reference_dev_file)
    assert len(examples) == 3197
    assert pq.read_schema(reference_dev_file).remove_metadata() == examples_lib.PARQUET_SCHEMA
    assert {e.data_source for e in examples} == {
        "nq", "tq", "hotpotqa", "2wiki", "musique", "Bamboogle", "popqa"}
    assert len({e.index for e in examples}) == len(examples)
    for e in examples:
        assert e.question == e.prompt[-1].content and e.prompt[-1].role == "user"
        assert e.golden_answers and all(e.golden_answers)
    # Several aliases are split on the separator, in their original order.
    first_multi = next(e for e in examples if len(e.golden_answers) > 1)
    raw = pq.read_table(reference_dev_file).to_pylist()
    raw_row = next(r for r in raw if r["extra_info"]["index"] == first_multi.index)
    assert "<|answer_split|>".join(first_multi.golden_answers) == \
        raw_row["reward_model"]["ground_truth"].strip()


def test_reads_a_small_fixture(tmp_path):
    path = _write_rows(tmp_path / "small.parquet", [
        _row(0),
        _row(1, prompt=[{"content": "You are helpful.", "role": "system"},
                        {"content": "First question?", "role": "user"},
                        {"content": "Thinking.", "role": "assistant"},
                        {"content": "What is the real question?", "role": "user"}]),
    ])
    first, second = examples_lib.load_examples(path)
    assert first == examples_lib.Example(
        index="nq_0", data_source="nq", question="Who wrote book 0?",
        golden_answers=("Author 0", "A. 0"),
        prompt=(examples_lib.Message("user", "Who wrote book 0?"),), split="train")
    assert second.question == "What is the real question?"
    assert second.chat_messages()[0] == {"role": "system", "content": "You are helpful."}


def test_reads_several_files_in_order(tmp_path):
    a = _write_rows(tmp_path / "a.parquet", [_row(0), _row(1)])
    b = _write_rows(tmp_path / "b.parquet", [_row(2)])
    assert [e.index for e in examples_lib.load_examples([b, a])] == ["nq_2", "nq_0", "nq_1"]


def test_integer_index_as_in_search_r1_files(tmp_path):
    schema = examples_lib.PARQUET_SCHEMA.set(4, pa.field("extra_info", pa.struct(
        [("index", pa.int64()), ("split", pa.string())])))
    row = _row(0) | {"extra_info": {"index": 7, "split": "test"}}
    (example,) = examples_lib.load_examples(_write_rows(tmp_path / "int.parquet", [row], schema))
    assert example.index == "7"


def test_write_then_load_round_trips(tmp_path):
    examples = _examples(5)
    examples_lib.write_examples(tmp_path / "out.parquet", examples)
    assert examples_lib.load_examples(tmp_path / "out.parquet") == examples
    assert pq.read_schema(tmp_path / "out.parquet").remove_metadata() == examples_lib.PARQUET_SCHEMA


def _load_error(path):
    with pytest.raises(examples_lib.DataError) as info:
        examples_lib.load_examples(path)
    return str(info.value)


def test_missing_column_names_file_and_column(tmp_path):
    table = pa.Table.from_pylist([_row(0), _row(1)], schema=examples_lib.PARQUET_SCHEMA)
    path = tmp_path / "no_reward.parquet"
    pq.write_table(table.drop_columns(["reward_model"]), path)
    message = _load_error(path)
    assert str(path) in message and "all rows" in message
    assert "'reward_model'" in message and "column missing" in message


def test_empty_ground_truth_names_file_row_and_field(tmp_path):
    path = _write_rows(tmp_path / "empty_gt.parquet", [_row(0), _row(1), _row(2, ground_truth=" ")])
    message = _load_error(path)
    assert str(path) in message and "row 2" in message
    assert "'reward_model.ground_truth'" in message and "empty ground truth" in message


def test_empty_alias_is_rejected(tmp_path):
    path = _write_rows(tmp_path / "alias.parquet", [_row(0, ground_truth="Paris<|answer_split|>")])
    message = _load_error(path)
    assert "row 0" in message and "'reward_model.ground_truth'" in message and "alias" in message


def test_non_string_prompt_content_names_file_row_and_field(tmp_path):
    schema = examples_lib.PARQUET_SCHEMA.set(1, pa.field("prompt", pa.list_(pa.struct(
        [("content", pa.int64()), ("role", pa.string())]))))
    path = _write_rows(tmp_path / "int_content.parquet",
                       [_row(0, prompt=[{"content": 42, "role": "user"}])], schema)
    message = _load_error(path)
    assert str(path) in message and "row 0" in message
    assert "'prompt[0].content'" in message and "expected a string" in message


def test_null_prompt_content_names_its_row(tmp_path):
    path = _write_rows(tmp_path / "null_content.parquet",
                       [_row(0), _row(1, prompt=[{"content": None, "role": "user"}])])
    message = _load_error(path)
    assert str(path) in message and "row 1" in message and "'prompt[0].content'" in message


def test_non_list_prompt_names_file_row_and_field(tmp_path):
    schema = examples_lib.PARQUET_SCHEMA.set(1, pa.field("prompt", pa.string()))
    path = _write_rows(tmp_path / "str_prompt.parquet",
                       [_row(0, prompt="Who wrote it?")], schema)
    message = _load_error(path)
    assert str(path) in message and "row 0" in message
    assert "'prompt'" in message and "expected a list" in message


def test_missing_user_message_names_file_row_and_field(tmp_path):
    path = _write_rows(tmp_path / "no_user.parquet", [
        _row(0), _row(1, prompt=[{"content": "You are helpful.", "role": "system"}])])
    message = _load_error(path)
    assert str(path) in message and "row 1" in message
    assert "'prompt'" in message and "no message with role 'user'" in message


def test_empty_file_is_rejected(tmp_path):
    path = _write_rows(tmp_path / "empty.parquet", [])
    assert _load_error(path) == f"{path}, all rows: the file has no rows"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        examples_lib.load_examples(tmp_path / "nowhere.parquet")


# ---------------------------------------------------------------------------------------------
# Iterator


def _indices(batches):
    return [[e.index for e in batch] for batch in batches]


def _take(iterator, n):
    return _indices(next(iterator) for _ in range(n))


def test_same_seed_gives_same_order_and_different_seed_a_different_one():
    examples = _examples(50)
    first = _take(examples_lib.BatchIterator(examples, 5, seed=3), 10)
    assert first == _take(examples_lib.BatchIterator(examples, 5, seed=3), 10)
    assert first != _take(examples_lib.BatchIterator(examples, 5, seed=4), 10)
    # Shuffled, not file order.
    assert first[0] != ["0", "1", "2", "3", "4"]


def test_epoch_rollover_drops_the_remainder_and_reshuffles():
    iterator = examples_lib.BatchIterator(_examples(10), 3, seed=0)
    assert iterator.batches_per_epoch == 3
    epoch0 = _take(iterator, 3)
    assert iterator.epoch == 0
    epoch1 = _take(iterator, 3)
    assert iterator.epoch == 1
    for epoch in (epoch0, epoch1):
        flat = [i for batch in epoch for i in batch]
        assert all(len(batch) == 3 for batch in epoch)
        assert len(set(flat)) == 9  # each example at most once per epoch
    assert epoch0 != epoch1


def test_without_drop_remainder_each_epoch_covers_every_example():
    iterator = examples_lib.BatchIterator(_examples(10), 3, seed=0, drop_remainder=False)
    assert iterator.batches_per_epoch == 4
    epoch0 = _take(iterator, 4)
    assert [len(batch) for batch in epoch0] == [3, 3, 3, 1]
    assert sorted(i for batch in epoch0 for i in batch) == sorted(str(i) for i in range(10))
    assert len(next(iterator)) == 3 and iterator.epoch == 1


def test_without_shuffle_batches_follow_file_order():
    assert _take(examples_lib.BatchIterator(_examples(4), 2, seed=0, shuffle=False), 3) == [
        ["0", "1"], ["2", "3"], ["0", "1"]]


def test_restore_mid_epoch_continues_with_identical_batches():
    examples = _examples(23)
    original = examples_lib.BatchIterator(examples, 4, seed=11)
    _take(original, 3)  # mid-epoch: 5 batches per epoch
    saved = json.loads(json.dumps(original.state()))  # as a checkpoint would store it
    expected = _take(original, 12)  # crosses two epoch boundaries
    resumed = examples_lib.BatchIterator(examples, 4, seed=0)  # the seed comes from the state
    resumed.restore(saved)
    assert _take(resumed, 12) == expected


@settings(max_examples=40, deadline=None)
@given(num_examples=st.integers(1, 30), batch_size=st.integers(1, 8),
       seed=st.integers(0, 2**32), batches_before=st.integers(0, 12),
       drop_remainder=st.booleans())
def test_restore_anywhere_continues_identically(num_examples, batch_size, seed, batches_before,
                                                drop_remainder):
    if drop_remainder and batch_size > num_examples:
        return
    examples = _examples(num_examples)
    original = examples_lib.BatchIterator(examples, batch_size, seed, drop_remainder=drop_remainder)
    _take(original, batches_before)
    state = original.state()
    resumed = examples_lib.BatchIterator(examples, batch_size, seed, drop_remainder=drop_remainder)
    resumed.restore(state)
    assert _take(resumed, 6) == _take(original, 6)


@settings(max_examples=40, deadline=None)
@given(num_examples=st.integers(1, 30), batch_size=st.integers(1, 8), batches=st.integers(0, 20),
       drop_remainder=st.booleans())
def test_questions_drawn_counts_every_example_handed_out_and_survives_a_restore(num_examples, batch_size, batches,
                                                                               drop_remainder):
    if drop_remainder and batch_size > num_examples:
        return
    examples = _examples(num_examples)
    original = examples_lib.BatchIterator(examples, batch_size, seed=3, drop_remainder=drop_remainder)
    handed_out = sum(len(batch) for batch in _take(original, batches))
    assert original.questions_drawn == handed_out
    resumed = examples_lib.BatchIterator(examples, batch_size, seed=3, drop_remainder=drop_remainder)
    resumed.restore(original.state())
    assert resumed.questions_drawn == handed_out


def test_restore_rejects_a_different_data_set():
    state = examples_lib.BatchIterator(_examples(10), 2, seed=0).state()
    with pytest.raises(ValueError, match="10 examples"):
        examples_lib.BatchIterator(_examples(12), 2, seed=0).restore(state)


def test_epoch_order_is_a_permutation():
    order = examples_lib.epoch_order(1000, seed=5, epoch=2)
    assert sorted(order.tolist()) == list(range(1000))
    assert order.tolist() != examples_lib.epoch_order(1000, seed=5, epoch=3).tolist()


def test_batch_larger_than_data_is_rejected():
    with pytest.raises(ValueError, match="larger than the data"):
        examples_lib.BatchIterator(_examples(3), 4, seed=0)


def test_evaluation_batches_cover_everything_once_in_order():
    assert _indices(examples_lib.evaluation_batches(_examples(5), 2)) == [["0", "1"], ["2", "3"], ["4"]]
