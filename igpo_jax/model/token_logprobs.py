"""Log-probabilities of given next tokens, without materialising [B, T, V] logits.

Legend: B batch, T tokens, D hidden, V vocab, C positions per chunk, N chunks, P = B·T flat positions.

For a 150k vocabulary the logits of one 8k-token row are 5 GB in fp32; scoring and the policy
update only need log p(target) (and the entropy), so the vocab projection runs over chunks of
positions and the backward pass recomputes each chunk's logits.

The vocab projection is the largest matmul of a small model (d·V per position), and in an RL
batch many positions need no log-prob at all: prompts, tool results and padding carry no loss.
Given `needed_BT`, the needed positions are gathered to the front of one flat sequence, and the
chunks past them are skipped with `lax.cond`: the projection costs ∝ the loss tokens (rounded
up to one chunk), not ∝ B·T, and positions not needed read 0.

The gradient is written out (`custom_vjp`) rather than derived through `lax.map` + `cond` +
`jax.checkpoint`: JAX's derivation saved the [V, D] projection weight once per chunk as a
residual (a [N, V, D] stack, 450 MB per micro-batch for SmolLM2) and slices it back per chunk.
Written out, the backward pass is one scan over the chunks that recomputes the logits, forms
d logits in one elementwise pass from the saved log-normaliser, and accumulates the weight's
gradient in a float32 carry.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from igpo_jax.model.projection import project
from igpo_jax.runtime.sharding import constrain


def _logits(hidden_CD, weight_DV, dtype):
    """fp32 logits of one chunk; the matmul in the compute dtype (as `Decoder.logits_from_hidden`)."""
    return constrain(project("cd,dv->cv", hidden_CD.astype(dtype), weight_DV, jnp.float32), ("batch", "vocab"))


def _chunk_stats(hidden_CD, targets_C, weight_DV, dtype, with_entropy: bool):
    """(log p(target), entropy, log-normaliser) of one chunk's positions."""
    logits = _logits(hidden_CD, weight_DV, dtype)
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, targets_C[:, None], axis=-1)[:, 0] - logz
    if not with_entropy:
        return logp, jnp.zeros_like(logp), logz
    entropy = logz - jnp.sum(jnp.exp(logits - logz[:, None]) * logits, axis=-1)
    return logp, entropy, logz


def _all_chunks(weight_DV, hidden_NCD, targets_NC, live, dtype, with_entropy):
    zeros = jnp.zeros(targets_NC.shape[1:], jnp.float32)

    def one_chunk(xs):
        i, h, y = xs
        return jax.lax.cond(i < live, lambda: _chunk_stats(h, y, weight_DV, dtype, with_entropy),
                            lambda: (zeros, zeros, zeros))

    return jax.lax.map(one_chunk, (jnp.arange(targets_NC.shape[0]), hidden_NCD, targets_NC))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_logprobs(weight_DV, hidden_NCD, targets_NC, live, dtype, with_entropy):
    """(logp_NC, entropy_NC) of chunks `i < live`; 0 in the chunks past them."""
    logp, entropy, _ = _all_chunks(weight_DV, hidden_NCD, targets_NC, live, dtype, with_entropy)
    return logp, entropy


def _forward(weight_DV, hidden_NCD, targets_NC, live, dtype, with_entropy):
    logp, entropy, logz = _all_chunks(weight_DV, hidden_NCD, targets_NC, live, dtype, with_entropy)
    return (logp, entropy), (weight_DV, hidden_NCD, targets_NC, live, logz, entropy)


def _backward(dtype, with_entropy, residuals, cotangents):
    """d logp_y / d logit_v = [v = y] − p_v;  d H / d logit_v = −p_v (log p_v + H)."""
    weight_DV, hidden_NCD, targets_NC, live, logz_NC, entropy_NC = residuals
    d_logp_NC, d_entropy_NC = cotangents

    def one_chunk(d_weight_DV, xs):
        i, h, y, logz, entropy, d_logp, d_entropy = xs

        def compute():
            logq = _logits(h, weight_DV, dtype) - logz[:, None]  # log p
            p = jnp.exp(logq)
            scale = d_logp[:, None]
            if with_entropy:
                scale = scale + d_entropy[:, None] * (logq + entropy[:, None])
            is_target = jax.lax.broadcasted_iota(jnp.int32, logq.shape, 1) == y[:, None]
            d_logits = (jnp.where(is_target, d_logp[:, None], 0.0) - p * scale).astype(dtype)
            d_hidden = jnp.einsum("cv,dv->cd", d_logits, weight_DV.astype(dtype),
                                  preferred_element_type=jnp.float32)
            d_weight = jnp.einsum("cd,cv->dv", h.astype(dtype), d_logits, preferred_element_type=jnp.float32)
            return d_weight_DV + d_weight, d_hidden.astype(h.dtype)

        return jax.lax.cond(i < live, compute, lambda: (d_weight_DV, jnp.zeros_like(h)))

    xs = (jnp.arange(targets_NC.shape[0]), hidden_NCD, targets_NC, logz_NC, entropy_NC, d_logp_NC, d_entropy_NC)
    d_weight_DV, d_hidden_NCD = jax.lax.scan(one_chunk, jnp.zeros(weight_DV.shape, jnp.float32), xs)
    return d_weight_DV.astype(weight_DV.dtype), d_hidden_NCD, None, None


_chunked_logprobs.defvjp(_forward, _backward)


def _chunked(x, chunk: int):
    """[P, ...] → [P_padded / chunk, chunk, ...] (zero padding at the end)."""
    pad = (-x.shape[0]) % chunk
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def logprobs_from_hidden(model, hidden_BTD, targets_BT, chunk: int = 128, with_entropy: bool = False,
                         needed_BT=None):
    """log p(targets_BT[b, t] | hidden_BTD[b, t]) and (optionally) the entropy, both [B, T] fp32.

    `needed_BT` (bool, optional): only these positions are computed; the others are 0.
    With `model.cfg.logprob_temperature` T ≠ 1 they are of softmax(logits / T), and logits / T =
    (hidden / T) · W: the hidden states are scaled (in float32, before the compute-dtype cast), so
    the custom gradient below stays the untempered one and autodiff adds the 1/T.
    """
    temperature = model.cfg.logprob_temperature
    if temperature != 1.0:
        hidden_BTD = hidden_BTD.astype(jnp.float32) / temperature
    b, t, d = hidden_BTD.shape
    p = b * t
    hidden_PD = hidden_BTD.reshape(p, d)
    targets_P = targets_BT.reshape(p)
    # `chunk` positions of every row per projection: B·chunk rows, as wide as a [B, chunk] slice
    c = min(chunk * b, p)
    if needed_BT is None:
        order_P = None
        live = jnp.asarray((p + c - 1) // c, jnp.int32)
    else:
        # stable: needed positions first, in their original order (a permutation, so the
        # gradient's scatter back touches every row once)
        order_P = jnp.argsort(~needed_BT.reshape(p).astype(bool), stable=True)
        hidden_PD, targets_P = hidden_PD[order_P], targets_P[order_P]
        live = (jnp.sum(needed_BT.astype(jnp.int32)) + c - 1) // c
    logp, entropy = _chunked_logprobs(model.vocab_weight(), _chunked(hidden_PD, c), _chunked(targets_P, c), live,
                                      model.cfg.jnp_dtype, with_entropy)
    logp, entropy = logp.reshape(-1)[:p], entropy.reshape(-1)[:p]
    if order_P is not None:
        inverse_P = jnp.argsort(order_P)  # gather back instead of scattering
        needed_P = needed_BT.reshape(p).astype(bool)  # the last live chunk also holds others
        logp = jnp.where(needed_P, logp[inverse_P], 0.0)
        entropy = jnp.where(needed_P, entropy[inverse_P], 0.0)
    return logp.reshape(b, t), entropy.reshape(b, t)
