"""project: bf16 inputs with float32 accumulation, and the hand-written backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpo_jax.model.projection import project

EQUATIONS = [("btd,df->btf", (2, 5, 8), (8, 6)), ("btd,dnh->btnh", (2, 5, 8), (8, 3, 4)),
             ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 8)), ("pd,vd->pv", (7, 8), (11, 8))]


def _operands(x_shape, w_shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=x_shape).astype(np.float32), rng.normal(size=w_shape).astype(np.float32)


@pytest.mark.parametrize("equation,x_shape,w_shape", EQUATIONS)
def test_float32_is_the_plain_einsum(equation, x_shape, w_shape):
    x, w = _operands(x_shape, w_shape)
    np.testing.assert_array_equal(project(equation, jnp.asarray(x), jnp.asarray(w)), jnp.einsum(equation, x, w))


@pytest.mark.parametrize("equation,x_shape,w_shape", EQUATIONS)
def test_bf16_forward_and_gradients_accumulate_in_float32(equation, x_shape, w_shape):
    x, w = _operands(x_shape, w_shape)
    x16 = jnp.asarray(x, jnp.bfloat16)
    w32 = jnp.asarray(w)  # float32 master weights, cast to bf16 inside
    x_r, w_r = np.asarray(x16, np.float32), np.asarray(w32.astype(jnp.bfloat16), np.float32)  # what the product sees
    out = project(equation, x16, w32)
    assert out.dtype == jnp.bfloat16
    # one rounding of the float32 sum, so within half a bf16 ulp of the exact product
    exact = np.einsum(equation, x_r.astype(np.float64), w_r.astype(np.float64))
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2 ** -8, atol=1e-6)
    assert project(equation, x16, w32, jnp.float32).dtype == jnp.float32

    g = np.random.default_rng(1).normal(size=exact.shape).astype(np.float32)
    g_r = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float32)
    dx, dw = jax.grad(lambda a, b: jnp.sum(project(equation, a, b).astype(jnp.float32) * g), argnums=(0, 1))(x16, w32)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32  # the weight's gradient is never rounded to bf16
    inputs, out_idx = equation.split("->")
    x_idx, w_idx = inputs.split(",")
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.einsum(f"{out_idx},{w_idx}->{x_idx}", g_r, w_r),
                               rtol=2 ** -8, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum(f"{x_idx},{out_idx}->{w_idx}", x_r, g_r), rtol=1e-5, atol=1e-5)
