"""The shared-prefix update on 8 simulated CPU devices (fsdp=4 × tensor=2), and with identical rows
computed once (row_selection.py), run in a subprocess by shared_prefix_test.py (the device count
is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.shared_prefix_checks MODEL_DIR
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from igpo_jax.runtime import distributed, sharding
from igpo_jax.model import shared_prefix
from igpo_jax.model.weights import load_hf
from igpo_jax.training.update import UpdateBatch, UpdateConfig, _gradient_program, compute_logprobs
from tests.shared_prefix_test import G, ragged_groups


def _gradients(model, host, cfg, num_micro, layout, mesh=None, totals=None):
    graphdef, params = nnx.split(model)
    if mesh is None:
        batch = UpdateBatch(**{k: jnp.asarray(v) for k, v in host.items()})
        return _gradient_program(graphdef, params)(graphdef, params, batch, cfg, num_micro, False, layout, totals)
    shape = host["tokens_NL"].shape
    spec = sharding.logical_to_spec(("batch", "length"), sharding.DEFAULT_RULES, mesh, shape)
    placed = distributed.host_local_batch_to_global({k: v for k, v in host.items() if v.ndim == 2}, mesh, spec)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec[0]))
    batch = UpdateBatch(**placed, **{k: jax.device_put(v, rows) for k, v in host.items() if v.ndim == 1})
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        out = _gradient_program(graphdef, params)(graphdef, params, batch, cfg, num_micro, False, layout, totals)
        ref = compute_logprobs(model, batch.tokens_NL, batch.valid_NL, G, prefix_len_N=batch.prefix_len_N,
                               layout=layout, needed_NL=batch.loss_mask_NL > 0)
    return out, ref


def main(model_dir: str):
    assert len(jax.devices()) == 8, jax.devices()
    plain = load_hf(model_dir)
    tokens, valid, loss, advantage = ragged_groups(plain.cfg.vocab_size)
    split = shared_prefix.group_prefix_lengths(tokens, valid, loss, G)
    layout = shared_prefix.layout_for(split, valid, G, multiple=8)
    old = np.asarray(compute_logprobs(plain, tokens, valid))
    host = dict(tokens_NL=tokens, valid_NL=valid, loss_mask_NL=loss, advantage_NL=advantage,
                old_logp_NL=old - 0.02 * loss, ref_logp_NL=old - 0.05 * loss)
    cfg = UpdateConfig(lr=1e-3, entropy_coeff=0.01, loss_agg_mode="seq-mean-token-mean")
    loss_1, grads_1, _ = _gradients(plain, host, cfg, 3, None)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = load_hf(model_dir, mesh=mesh, rules=sharding.DEFAULT_RULES)
    (loss_8, grads_8, _), ref_8 = _gradients(model, dict(host, prefix_len_N=split), cfg, 3, layout, mesh)
    assert len(model.layers[0].mlp.up_proj[...].addressable_shards) == 8
    np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-5)
    worst = 0.0
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8)):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(b, a, atol=1e-5 * scale, rtol=0)
        worst = max(worst, float(np.abs(a - b).max()))
    np.testing.assert_allclose(np.asarray(ref_8)[loss > 0], old[loss > 0], atol=1e-5, rtol=0)
    print(f"shared prefix on 8 devices equals unshared on one: loss {float(loss_8):.8f} vs {float(loss_1):.8f}, "
          f"max |dgrad| {worst:.2e}")
    check_identical_rows_once(plain, model, mesh)


def check_identical_rows_once(plain, model, mesh):
    """Identical rows once (weights, shared prefix groups of G_u rows) and zero-advantage rows
    skipped, on the mesh: the loss and gradients of every row on one device."""
    from igpo_jax.training import row_selection
    from tests.row_selection_test import duplicated_groups

    (tokens, valid, loss, advantage), first = duplicated_groups(plain.cfg.vocab_size, zero_rows=(3,))
    split = shared_prefix.group_prefix_lengths(tokens, valid, loss, G)
    layout = shared_prefix.layout_for(split, valid, G, multiple=8)
    old = np.asarray(compute_logprobs(plain, tokens, valid))
    host = dict(tokens_NL=tokens, valid_NL=valid, loss_mask_NL=loss, advantage_NL=advantage,
                old_logp_NL=old - 0.02 * loss, ref_logp_NL=old - 0.05 * loss)
    cfg = UpdateConfig(lr=1e-3, use_kl_loss=False, loss_agg_mode="seq-mean-token-mean")
    loss_1, grads_1, _ = _gradients(plain, host, cfg, 3, None)
    active = row_selection.rows_with_gradient(advantage, loss, kl_or_entropy=False)
    facts = row_selection.RowFacts(first, active, loss.sum(1).astype(int))
    sel = row_selection.select(facts, np.arange(len(first)), 3, G)
    picked = {k: v[sel.rows_U] for k, v in host.items()}
    picked.update(prefix_len_N=split[sel.rows_U], weight_N=sel.weight_U)
    lay = shared_prefix.PrefixLayout(sel.group_size, layout.prefix_len, layout.suffix_len)
    (loss_8, grads_8, _), _ = _gradients(model, picked, cfg, 3, lay, mesh,
                                         (np.float32(sel.num_tokens), np.float32(sel.num_seqs)))
    np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-5, atol=2e-6)
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * max(1.0, float(np.abs(a).max())), rtol=0)
    print(f"identical rows once on 8 devices ({sel.computed} of {len(first)} rows computed) equal every row on one")


if __name__ == "__main__":
    main(*sys.argv[1:])
