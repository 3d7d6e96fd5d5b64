"""Log-probabilities of given next tokens, without materialising [B, T, V] logits.

Legend: B batch, T tokens, D hidden, V vocab, C rows per projection, P = B·T flat positions.

For a 150k vocabulary the logits of one 8k-token row are 5 GB in fp32; scoring and the policy
update only need log p(target) (and the entropy), so the vocab projection runs over chunks of
positions inside `lax.map` and each chunk is rematerialised in the backward pass.

The vocab projection is the largest matmul of a small model (d·V per position), and in an RL
batch many positions need no log-prob at all: prompts, tool results and padding carry no loss.
Given `needed_BT`, the needed positions are gathered to the front of one flat sequence, and the
chunks past them are skipped with `lax.cond`: the projection costs ∝ the loss tokens (rounded
up to one chunk), not ∝ B·T, and positions not needed read 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_stats(model, hidden_CD, targets_C, with_entropy: bool):
    logits = model.logits_from_hidden(hidden_CD)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_C[..., None], axis=-1)[..., 0]
    logp = target_logit - logz
    if not with_entropy:
        return logp, jnp.zeros_like(logp)
    probs = jax.nn.softmax(logits, axis=-1)
    entropy = logz - jnp.sum(probs * logits, axis=-1)
    return logp, entropy


def _chunked(x, chunk: int):
    """[P, ...] → [P_padded / chunk, chunk, ...] (zero padding at the end)."""
    pad = (-x.shape[0]) % chunk
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def logprobs_from_hidden(model, hidden_BTD, targets_BT, chunk: int = 128, with_entropy: bool = False,
                         needed_BT=None):
    """log p(targets_BT[b, t] | hidden_BTD[b, t]) and (optionally) the entropy, both [B, T] fp32.

    `needed_BT` (bool, optional): only these positions are computed; the others are 0.
    """
    b, t, d = hidden_BTD.shape
    p = b * t
    hidden_PD = hidden_BTD.reshape(p, d)
    targets_P = targets_BT.reshape(p)
    if needed_BT is None:
        order_P = None
        live_chunks = None
    else:
        # stable: needed positions first, in their original order (a permutation, so the
        # gradient's scatter back touches every row once)
        order_P = jnp.argsort(~needed_BT.reshape(p).astype(bool), stable=True)
        hidden_PD, targets_P = hidden_PD[order_P], targets_P[order_P]
        live_chunks = (jnp.sum(needed_BT.astype(jnp.int32)) + chunk - 1) // chunk
    # `chunk` positions of every row per projection: B·chunk rows, as wide as a [B, chunk] slice
    c = min(chunk * b, p)
    stats = jax.checkpoint(lambda h, y: _chunk_stats(model, h, y, with_entropy))

    def one_chunk(xs):
        i, h, y = xs
        if live_chunks is None:
            return stats(h, y)
        zeros = jnp.zeros(y.shape, jnp.float32)
        return jax.lax.cond(i < live_chunks, lambda: stats(h, y), lambda: (zeros, zeros))

    h_chunks, y_chunks = _chunked(hidden_PD, c), _chunked(targets_P, c)
    index = jnp.arange(h_chunks.shape[0])
    logp, entropy = jax.lax.map(one_chunk, (index, h_chunks, y_chunks))
    logp, entropy = logp.reshape(-1)[:p], entropy.reshape(-1)[:p]
    if order_P is not None:
        inverse_P = jnp.argsort(order_P)  # gather back instead of scattering
        needed_P = needed_BT.reshape(p).astype(bool)  # the last live chunk also holds others
        logp = jnp.where(needed_P, logp[inverse_P], 0.0)
        entropy = jnp.where(needed_P, entropy[inverse_P], 0.0)
    return logp.reshape(b, t), entropy.reshape(b, t)
