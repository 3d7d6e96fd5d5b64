"""Log-probabilities of given next tokens, without materialising [B, T, V] logits.

Legend: B batch, T tokens, D hidden, V vocab, C chunk of positions.

For a 150k vocabulary the logits of one 8k-token row are 5 GB in fp32; scoring and the policy
update only need log p(target) (and the entropy), so the vocab projection runs over chunks of
positions inside `lax.map` and each chunk is rematerialised in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_stats(model, hidden_BCD, targets_BC, with_entropy: bool):
    logits = model.logits_from_hidden(hidden_BCD)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BC[..., None], axis=-1)[..., 0]
    logp = target_logit - logz
    if not with_entropy:
        return logp, jnp.zeros_like(logp)
    probs = jax.nn.softmax(logits, axis=-1)
    entropy = logz - jnp.sum(probs * logits, axis=-1)
    return logp, entropy


def logprobs_from_hidden(model, hidden_BTD, targets_BT, chunk: int = 128, with_entropy: bool = False):
    """log p(targets_BT[b, t] | hidden_BTD[b, t]) and (optionally) the entropy, both [B, T] fp32."""
    b, t, d = hidden_BTD.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    hidden = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hidden = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    targets = targets.reshape(b, n, chunk).swapaxes(0, 1)
    stats = jax.checkpoint(lambda h, y: _chunk_stats(model, h, y, with_entropy))
    logp, entropy = jax.lax.map(lambda xs: stats(*xs), (hidden, targets))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return unchunk(logp), unchunk(entropy)
