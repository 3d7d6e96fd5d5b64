"""Checkpoints in and out: GGUF against transformers, export round trip, and every error path."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from igpo_jax.model import config as config_lib
from igpo_jax.model.qwen import forward_padded
from igpo_jax.model.weights import CheckpointError, export_hf, load, load_gguf, load_hf
from tests.conftest import write_tiny_hf_model
from tests.model_test import _assert_close_on_valid, _hf_logits, _left_padded_batch


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_path):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def test_smollm2_gguf_matches_transformers_on_a_chat_prompt(smollm2, smollm2_tokenizer, smollm2_reference):
    messages = [{"role": "system", "content": "You are a helpful research assistant."},
                {"role": "user", "content": "Who founded the city of Valdoria, and when?"}]
    text = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = np.asarray([smollm2_tokenizer(text)["input_ids"]], np.int32)
    valid = np.ones_like(ids, bool)
    ours = np.asarray(jax.jit(forward_padded)(smollm2, ids, valid))
    ref = _hf_logits(smollm2_reference, ids, valid)
    _assert_close_on_valid(ours, ref, valid, rtol=1e-4)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))  # greedy next tokens agree


def test_smollm2_config_from_gguf_metadata(smollm2):
    cfg = smollm2.cfg
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert cfg == config_lib.preset("SmolLM2-135M-Instruct")


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_export_round_trip_through_transformers(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    write_tiny_hf_model(model_type, tmp_path / "src")
    ours = load_hf(str(tmp_path / "src"))
    export_hf(ours, str(tmp_path / "out"), max_shard_bytes=40_000)  # force a sharded export
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    tokens, valid = _left_padded_batch(ours.cfg.vocab_size)
    _assert_close_on_valid(forward_padded(ours, tokens, valid), _hf_logits(reloaded, tokens, valid), valid)
    # and back into ours, from the sharded index
    again = load_hf(str(tmp_path / "out"))
    np.testing.assert_allclose(forward_padded(again, tokens, valid), forward_padded(ours, tokens, valid), rtol=1e-6)


def test_export_of_smollm2_with_tokenizer(smollm2, smollm2_tokenizer, smollm2_reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_hf(smollm2, str(tmp_path), tokenizer=smollm2_tokenizer)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nHello there<|im_end|>\n"
    assert tok(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = np.asarray([tok(text)["input_ids"]], np.int32)
    valid = np.ones_like(ids, bool)
    _assert_close_on_valid(_hf_logits(reloaded, ids, valid), _hf_logits(smollm2_reference, ids, valid), valid, 1e-5)


# ------------------------------------------------------------------------------- error paths


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_missing_tensor_is_named(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf(str(tmp_path))


def test_unexpected_shape_is_named(tmp_path):
    write_tiny_hf_model("llama", tmp_path)
    _edit_config(tmp_path, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' .* shape \(64, 96\).*expected \(64, 80\)"):
        load_hf(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    write_tiny_hf_model("llama", tmp_path)
    _edit_config(tmp_path, model_type="gpt2")
    with pytest.raises(config_lib.UnsupportedModelError, match="unsupported architecture model_type='gpt2'"):
        load_hf(str(tmp_path))


def test_unsupported_rope_scaling(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    with pytest.raises(config_lib.UnsupportedModelError, match="unsupported rope scaling type 'yarn'"):
        load_hf(str(tmp_path))


def test_unsupported_gguf_type_is_named(tmp_path):
    import gguf

    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in {"block_count": 1, "embedding_length": 8, "feed_forward_length": 16,
                       "attention.head_count": 2, "attention.head_count_kv": 2,
                       "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": 4}.items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), np.int8))  # integer tensors: not weights
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="tensor 'token_embd.weight' .* unsupported GGUF type I8"):
        load_gguf(path)


def test_bad_paths():
    with pytest.raises(FileNotFoundError, match="neither an HF model directory nor a .gguf file"):
        load("/nonexistent/model.bin")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load("/nonexistent/model.gguf")


def test_a_gguf_file_is_parsed_once_for_weights_and_tokenizer(monkeypatch, tmp_path):
    import shutil

    import gguf

    from igpo_jax.model import embedded, weights
    from igpo_jax.model.tokenizer import load_tokenizer

    path = str(tmp_path / "model.gguf")
    shutil.copy(embedded.smollm2_gguf_path(), path)
    parsed, real = [], gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda p, *a, **k: parsed.append(p) or real(p, *a, **k))
    tokenizer = load_tokenizer(path)
    model = load_gguf(path)
    assert parsed == [path] and model.cfg.vocab_size == len(tokenizer)
    os.utime(path, ns=(1, 1))  # a changed file is parsed again
    load_tokenizer(path)
    assert parsed == [path, path]
