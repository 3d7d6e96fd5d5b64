"""cuDNN's fused attention for the mask form it takes without an O(T·S) array, and the route that
picks it over the blockwise kernel.

Legend: B batch, T queries, S keys, K kv heads, G query heads per kv head, N = K·G, H head dim.

On an NVIDIA GPU, `jax.nn.dot_product_attention(..., implementation='cudnn')` is cuDNN's fused flash
attention: O(length) memory in forward and backward as blockwise_attention.py has, in one kernel
instead of plain-JAX loops. It reads a mask as a causal flag (query t sees keys ≤ t, top-left
aligned) and per-row lengths (keys ≥ n invisible) only, or else as a dense [B, N, T, S] bias: the
memory this path exists to avoid (and cuDNN's backward with explicit masks has had NaN bugs).
One of the project's masks is exactly a flag and lengths: causal over right-padded rows
(`attention_mask.causal_spec(valid, right_padded=True)`, form 'right_padded_causal': the update's
forward and backward and the π_old / π_ref forwards over unpacked rows without shared prefixes).
There `is_causal=True` and `key_value_seq_lengths = n` give the MaskSpec rule for every query,
padding queries included (in both they see the row's n real keys).

`route` sends everything else to the blockwise kernel: the other forms (packed segments, KV caches
with holes, the IG copies, left padding, bool masks), fp32 (cuDNN takes bf16 and fp16 only), head
dims cuDNN refuses (a multiple of 8, ≤ 128 before Hopper, ≤ 256 from it), CPU, TPU and ROCm, and a
config without `model.gpu_fused_attention`. qwen.py also keeps blockwise for a shard of a row split
over a `sequence` mesh axis: its queries do not start at key 0.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp

from igpo_jax.model.attention_mask import MaskSpec, mask_form

CUDNN_FORMS = ("right_padded_causal",)
CUDNN_DTYPES = ("bfloat16", "float16")


def route(form: str, dtype, platform: str, head_dim: int, enabled: bool, max_head_dim: int = 128) -> str:
    """'cudnn' or 'blockwise' for attention under a mask of `form` (attention_mask.mask_form) with
    q, k, v in `dtype` on `platform` ('cuda' | 'rocm' | 'cpu' | 'tpu'); `enabled`: the config's
    model.gpu_fused_attention; `max_head_dim`: cuDNN's limit on this GPU (`cudnn_max_head_dim`)."""
    fits = (form in CUDNN_FORMS and jnp.dtype(dtype).name in CUDNN_DTYPES
            and head_dim % 8 == 0 and head_dim <= max_head_dim)
    return "cudnn" if enabled and platform == "cuda" and fits else "blockwise"


def platform() -> str:
    """'cuda' on an NVIDIA GPU backend, 'rocm' on an AMD one, else jax.default_backend() ('cpu',
    'tpu'). (jax names both GPU backends 'gpu'; its cuDNN wrapper tells them apart this way.)"""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "cuda" if "cuda" in jax.extend.backend.get_backend().platform_version.lower() else "rocm"


def cudnn_max_head_dim() -> int:
    """The largest head dim cuDNN's flash attention takes here: 256 from Hopper (compute capability
    9.0) on, 128 before (jax's own check before it calls cuDNN)."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return 256 if capability and int(str(capability).split(".")[0]) >= 9 else 128


def kernel(mask, dtype, head_dim: int, enabled: bool) -> str:
    """`route` on this process's backend and GPU."""
    if not enabled:
        return "blockwise"
    where = platform()
    return route(mask_form(mask), dtype, where, head_dim, enabled, cudnn_max_head_dim() if where == "cuda" else 128)


def fused_attention(q_BTKGH, k_BSKH, v_BSKH, mask: MaskSpec, implementation: str | None = "cudnn"):
    """out_BTKGH = softmax(q·kᵀ/√H, masked) · v under a 'right_padded_causal' `mask`, through
    `jax.nn.dot_product_attention` (`implementation` 'xla' or None computes the same call on any
    backend: how the CPU tests check the mapping). Same values as `blockwise_attention`."""
    if mask_form(mask) not in CUDNN_FORMS:
        raise ValueError(f"fused_attention takes a mask of form {CUDNN_FORMS}, got {mask_form(mask)!r}")
    b, t, kh, g, h = q_BTKGH.shape
    s = k_BSKH.shape[1]
    if t != s:  # the form's queries are the row's tokens, slot = index: the causal flag's alignment
        raise ValueError(f"a right-padded causal mask has as many queries as keys, got {t} and {s}")
    valid_BS = mask.key_valid_BS
    n_B = jnp.sum(valid_BS, axis=1, dtype=jnp.int32)
    # [B, T, K·G, H]: query head k·G + g reads kv head k, jax.nn's grouping (and cuDNN's)
    out = jax.nn.dot_product_attention(q_BTKGH.reshape(b, t, kh * g, h), k_BSKH, v_BSKH, is_causal=True,
                                       key_value_seq_lengths=jnp.maximum(n_B, 1), implementation=implementation)
    out = out.reshape(b, t, kh, g, h)
    # A row without a valid key: no query sees anything, 0 as blockwise gives (length 1 above keeps
    # the kernel off an empty row). A row whose valid keys are not its first n broke the caller's
    # word: NaN, so that the update's non-finite guard skips the step instead of training on a
    # mask the row does not have.
    prefix_B = jnp.all(valid_BS == (jnp.arange(s)[None, :] < n_B[:, None]), axis=1)
    keep_B = prefix_B & (n_B > 0)
    fill_B = jnp.where(prefix_B, 0.0, jnp.nan).astype(out.dtype)
    return jnp.where(keep_B[:, None, None, None, None], out, fill_B[:, None, None, None, None])
