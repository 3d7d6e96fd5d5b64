"""The weights cache of GGUF files: the same bits as reading the file, no parse or dequantisation
on a second load, a new entry when the file changes, and a load that works when the cache cannot."""

from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from igpo_jax.model import gguf_file
from igpo_jax.model.tokenizer import load_tokenizer
from igpo_jax.model.weights import load_gguf


@pytest.fixture()
def counted(monkeypatch):
    """Counts GGUF parses and dequantised tensors (what a cached load must not do)."""
    import gguf

    calls = {"parse": 0, "dequantise": 0}
    real_reader, real_dequantize = gguf.GGUFReader, gguf.quants.dequantize

    def reader(*a, **k):
        calls["parse"] += 1
        return real_reader(*a, **k)

    def dequantize(*a, **k):
        calls["dequantise"] += 1
        return real_dequantize(*a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", reader)
    monkeypatch.setattr(gguf.quants, "dequantize", dequantize)
    return calls


def _fresh_process(monkeypatch, cache) -> None:
    """What a new run sees: the cache directory `cache`, nothing parsed in this process yet."""
    monkeypatch.setenv(gguf_file.ENV, str(cache))
    gguf_file._open.cache_clear()
    gguf_file._reader.cache_clear()


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _assert_same_bits(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}"))


def _write_tiny_gguf(path: str, seed: int = 0) -> None:
    """A one-layer llama GGUF with float32 tensors (a fast stand-in for SmolLM2)."""
    import gguf

    v, d, heads, kv, inter = 16, 8, 2, 1, 12
    h = d // heads
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in {"block_count": 1, "embedding_length": d, "feed_forward_length": inter,
                       "attention.head_count": heads, "attention.head_count_kv": kv,
                       "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": v}.items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"llama.{key}", value)
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "blk.0.attn_norm.weight": (d,),
              "blk.0.ffn_norm.weight": (d,), "blk.0.attn_q.weight": (heads * h, d),
              "blk.0.attn_k.weight": (kv * h, d), "blk.0.attn_v.weight": (kv * h, d),
              "blk.0.attn_output.weight": (d, heads * h), "blk.0.ffn_gate.weight": (inter, d),
              "blk.0.ffn_up.weight": (inter, d), "blk.0.ffn_down.weight": (d, inter)}
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _entries(cache) -> list[str]:
    return sorted(n for n in os.listdir(cache) if not n.startswith("."))


def test_smollm2_from_the_cache_is_the_file_bit_for_bit_without_parsing_or_dequantising(
        smollm2_path, counted, monkeypatch, tmp_path):
    path, cache = str(tmp_path / "model.gguf"), tmp_path / "cache"
    shutil.copy(smollm2_path, path)
    _fresh_process(monkeypatch, "off")
    reference, reference_tokenizer = _params(load_gguf(path)), load_tokenizer(path)
    reference_metadata = gguf_file.open_gguf(path).metadata

    _fresh_process(monkeypatch, cache)  # the first run: reads the file, fills the cache
    counted.update(parse=0, dequantise=0)
    _assert_same_bits(_params(load_gguf(path)), reference)
    load_tokenizer(path)
    assert counted == {"parse": 1, "dequantise": 272}  # every tensor once (SmolLM2 has 272)

    _fresh_process(monkeypatch, cache)  # the second run: the cache only
    counted.update(parse=0, dequantise=0)
    tokenizer = load_tokenizer(path)
    _assert_same_bits(_params(load_gguf(path)), reference)
    assert counted == {"parse": 0, "dequantise": 0}
    assert gguf_file.open_gguf(path).metadata == reference_metadata
    text = reference_tokenizer.apply_chat_template([{"role": "user", "content": "Where was Kel Dorn born? 1987"}],
                                                   tokenize=False, add_generation_prompt=True)
    assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
    assert tokenizer.get_vocab() == reference_tokenizer.get_vocab()
    assert tokenizer.chat_template == reference_tokenizer.chat_template


def test_a_changed_file_is_read_again_and_replaces_its_entry(counted, monkeypatch, tmp_path):
    path, cache = str(tmp_path / "tiny.gguf"), tmp_path / "cache"
    _write_tiny_gguf(path, seed=0)
    _fresh_process(monkeypatch, cache)
    load_gguf(path)
    (first,) = _entries(cache)

    _write_tiny_gguf(path, seed=1)  # new weights, same size
    os.utime(path, ns=(1, 1))
    _fresh_process(monkeypatch, "off")
    reference = _params(load_gguf(path))
    _fresh_process(monkeypatch, cache)
    counted.update(parse=0, dequantise=0)
    _assert_same_bits(_params(load_gguf(path)), reference)  # the new file's weights, not the cached ones
    assert counted["parse"] == 1 and counted["dequantise"] == 11
    (second,) = _entries(cache)  # the stale entry is gone
    assert second != first


def test_entries_of_deleted_files_are_removed_and_those_of_existing_copies_kept(monkeypatch, tmp_path):
    """Every fresh virtual environment installs the model at a new path: the entry of one that was
    deleted goes when the next entry is written; a copy that still exists keeps its own."""
    cache = tmp_path / "cache"
    paths = [str(tmp_path / f"venv{i}" / "tiny.gguf") for i in range(3)]
    for path in paths:
        os.makedirs(os.path.dirname(path))
        _write_tiny_gguf(path)
    _fresh_process(monkeypatch, cache)
    load_gguf(paths[0])
    load_gguf(paths[1])
    first, second = _entries(cache)
    assert first != second  # two existing copies: two entries
    shutil.rmtree(os.path.dirname(paths[0]))  # the first environment deleted

    _fresh_process(monkeypatch, cache)
    load_gguf(paths[2])
    entries = _entries(cache)
    assert len(entries) == 2 and gguf_file._entry_name(paths[1], *_size_mtime(paths[1])) in entries
    assert gguf_file._entry_name(paths[2], *_size_mtime(paths[2])) in entries


def _size_mtime(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def test_bfloat16_params_round_trip(counted, monkeypatch, tmp_path):
    """bfloat16 (which .npy cannot hold) is stored as its bits, next to a float32 copy."""
    path, cache = str(tmp_path / "tiny.gguf"), tmp_path / "cache"
    _write_tiny_gguf(path)
    _fresh_process(monkeypatch, "off")
    reference = _params(load_gguf(path, param_dtype="bfloat16", dtype="bfloat16"))
    assert reference[0].dtype == jax.numpy.bfloat16
    for _ in range(2):
        _fresh_process(monkeypatch, cache)
        _assert_same_bits(_params(load_gguf(path, param_dtype="bfloat16", dtype="bfloat16")), reference)
        load_gguf(path)  # float32 beside it
    assert counted["dequantise"] == 11 * 3  # off, then the first cached run's two dtypes; none after
    (entry,) = _entries(cache)
    assert sorted(os.listdir(cache / entry)) == ["bfloat16", "float32", "metadata.json"]


def test_an_unwritable_cache_warns_and_loads_from_the_file(monkeypatch, tmp_path, caplog):
    path = str(tmp_path / "tiny.gguf")
    _write_tiny_gguf(path)
    _fresh_process(monkeypatch, "off")
    reference = _params(load_gguf(path))
    (tmp_path / "a_file").write_text("")
    _fresh_process(monkeypatch, tmp_path / "a_file" / "cache")  # cannot be created
    with caplog.at_level(logging.WARNING):
        _assert_same_bits(_params(load_gguf(path)), reference)
    assert "cannot write the weights cache" in caplog.text and gguf_file.ENV in caplog.text


def test_a_damaged_entry_warns_falls_back_and_is_written_again(counted, monkeypatch, tmp_path, caplog):
    path, cache = str(tmp_path / "tiny.gguf"), tmp_path / "cache"
    _write_tiny_gguf(path)
    _fresh_process(monkeypatch, cache)
    reference = _params(load_gguf(path))
    (entry,) = _entries(cache)
    with open(cache / entry / "float32" / "blk.0.ffn_up.weight.npy", "r+b") as f:
        f.truncate(100)
    _fresh_process(monkeypatch, cache)
    counted.update(parse=0, dequantise=0)
    with caplog.at_level(logging.WARNING):
        _assert_same_bits(_params(load_gguf(path)), reference)
    assert "is damaged" in caplog.text and counted["dequantise"] == 1  # only the damaged tensor
    _fresh_process(monkeypatch, cache)  # the damaged folder was dropped; this run writes it again
    _assert_same_bits(_params(load_gguf(path)), reference)
    _fresh_process(monkeypatch, cache)
    counted.update(parse=0, dequantise=0)
    _assert_same_bits(_params(load_gguf(path)), reference)
    assert counted == {"parse": 0, "dequantise": 0}


def test_weights_over_the_size_limit_are_not_cached(monkeypatch, tmp_path):
    path, cache = str(tmp_path / "tiny.gguf"), tmp_path / "cache"
    _write_tiny_gguf(path)
    monkeypatch.setattr(gguf_file, "MAX_CACHED_BYTES", 100)
    _fresh_process(monkeypatch, cache)
    load_gguf(path)
    (entry,) = _entries(cache)
    assert os.listdir(cache / entry) == ["metadata.json"]  # the metadata only


def test_cache_dir_from_the_environment(tmp_path):
    home = os.path.expanduser("~")
    assert gguf_file.cache_dir({}) == os.path.join(home, ".cache", "igpo_jax", "weights")
    assert gguf_file.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "igpo_jax" / "weights")
    assert gguf_file.cache_dir({gguf_file.ENV: "off"}) is None
    assert gguf_file.cache_dir({gguf_file.ENV: "/x/y"}) == "/x/y"
