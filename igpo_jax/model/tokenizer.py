"""Tokenizers: transformers' `AutoTokenizer` for HF directories, and one built from GGUF metadata.

transformers' own GGUF path imports torch; ours builds the byte-level BPE with `tokenizers` from
the file's vocabulary, merges, token types and special ids, and wraps it in
`PreTrainedTokenizerFast` so chat templates and special tokens behave as usual.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase

# GGUF `tokenizer.ggml.token_type` values (llama.cpp): 3 control (special), 4 user-defined (added).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits (`tokenizer.ggml.pre`), as llama.cpp applies them. StarCoder-family
# vocabularies (SmolLM2 among them) split every digit on its own before the GPT-2 regex.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "default": (False, _GPT2_SPLIT), "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT), "starcoder": (True, _GPT2_SPLIT), "refact": (True, _GPT2_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT), "llama-bpe": (False, _LLAMA3_SPLIT),
}


class TokenizerError(ValueError):
    pass


def _gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from igpo_jax.model.gguf_file import open_gguf

    meta = open_gguf(path).metadata  # the weights cache's copy when it has one: no parse
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer type {kind!r} is not supported (only byte-level BPE 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise TokenizerError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(_PRE_SPLITS)}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    digits_apart, split = _PRE_SPLITS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits_apart else []
    steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def special(name):
        idx = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[int(idx)] if idx is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special("bos"), eos_token=special("eos"), unk_token=special("unknown"),
        pad_token=special("padding") or special("eos"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Tokenizer of an HF model directory or a .gguf file (local files only, never a hub)."""
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if path.endswith(".gguf"):
        if not os.path.exists(path):
            raise FileNotFoundError(f"GGUF file not found: {path!r}")
        return _gguf_tokenizer(path)
    raise FileNotFoundError(f"{path!r} is neither an HF model directory nor a .gguf file")


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]],
                tools: Sequence[dict[str, Any]] | None = None, add_generation_prompt: bool = True) -> str:
    """The chat template's text for `messages` (and the tool schemas, where the template has them)."""
    if tokenizer.chat_template is None:
        raise TokenizerError("this tokenizer has no chat template")
    return tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                         add_generation_prompt=add_generation_prompt, tokenize=False)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Ids that end an assistant turn: EOS plus the chat end markers the vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in vocab)
    return tuple(sorted(ids))
