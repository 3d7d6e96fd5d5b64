"""Weight projections in the model's compute dtype, accumulated in float32.

With a bf16 compute dtype, `einsum(x_bf16, w_bf16)` asks for a bf16 result, and XLA's CPU
backend then takes a path no faster than fp32; bf16 inputs with a float32 result take the
avx512_bf16 kernels instead (measured on the 2-core dev machine: 2048×576 @ 576×1536 in
11.6 ms against 23.8 ms, and 1536×576 @ 576×49152 in 382 ms against 720 ms). Accumulating in
float32 and rounding once is also the more accurate of the two, and it is what GPUs and TPUs do
natively.

The backward pass is written out (`custom_vjp`) so that it keeps the same form: the input's
gradient is a bf16 × bf16 → float32 product rounded to bf16, and the weight's gradient stays in
the parameter's dtype (float32 master weights get float32 gradients, never rounded to bf16).
With float32 inputs and weights `project` is the plain einsum, bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def project(equation: str, x, w, out_dtype=None):
    """`einsum(equation, x, w)` with `w` cast to `x.dtype`; the result in `out_dtype` (default:
    `x.dtype`). `equation` is explicit ("btd,df->btf"), and each index of `x` and of `w` must
    appear in the output or in the other operand (a projection, not a reduction)."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if x.dtype == jnp.float32 and w.dtype == jnp.float32:
        return jnp.einsum(equation, x, w).astype(out_dtype)
    return _mixed_einsum(equation, out_dtype, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(equation, out_dtype, x, w):
    return jnp.einsum(equation, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _forward(equation, out_dtype, x, w):
    return _mixed_einsum(equation, out_dtype, x, w), (x, w)


def _backward(equation, out_dtype, residuals, g):
    x, w = residuals
    inputs, out = equation.split("->")
    x_idx, w_idx = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{w_idx}->{x_idx}", g, w.astype(x.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{x_idx},{out}->{w_idx}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_mixed_einsum.defvjp(_forward, _backward)
