"""Checks that need several (simulated) devices; run in a subprocess by multidevice_test.py,
because the device count is fixed when JAX starts.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.multidevice_checks sampling DIR
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.multidevice_checks \
        multiprocess DIR 127.0.0.1:PORT PROCESS_ID OUT_DIR        (one of two processes)
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from igpo_jax.runtime import sharding
from igpo_jax.model.weights import load_hf
from igpo_jax.rollout.sampler import Sampler, SamplingParams

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 7, 12], [100, 2, 33, 4, 9], [1, 2, 3, 4]]


def check_sampling(model_dir: str):
    assert len(jax.devices()) == 8, jax.devices()
    greedy = SamplingParams(temperature=0.0)
    plain = load_hf(model_dir)
    expected = [o.tokens for o in Sampler(plain, None, 4, 64, greedy).generate(PROMPTS, [0] * 4, 12)]

    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    model = load_hf(model_dir, mesh=mesh, rules=rules)  # loaded straight into its shardings
    q = model.layers[0].attn.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None), q.sharding.spec
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (q.shape[0] // 4, q.shape[1] // 2, q.shape[2])
    with sharding.activate(mesh, rules):
        s = Sampler(model, None, 4, 64, greedy, mesh=mesh, rules=rules)
        got = [o.tokens for o in s.generate(PROMPTS, [0] * 4, 12)]
        k_spec = s.cache.k_layers[0].sharding.spec
    assert got == expected, (got, expected)
    assert "tensor" in str(k_spec) and "fsdp" in str(k_spec), k_spec
    print("sampling under fsdp=4 x tensor=2 equals unsharded greedy output")


UPDATE_ROWS, UPDATE_LEN = 8, 12


def update_batch_np(vocab_size: int) -> dict[str, np.ndarray]:
    """A fixed update batch (host arrays): two turns per row, one row right-padded. π_old is
    irrelevant (the first mini-batch takes π_old = π_θ); π_ref is a constant so the KL term acts."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, (UPDATE_ROWS, UPDATE_LEN)).astype(np.int32)
    valid = np.ones((UPDATE_ROWS, UPDATE_LEN), bool)
    valid[1, 9:] = False
    loss_mask = np.zeros((UPDATE_ROWS, UPDATE_LEN), np.float32)
    loss_mask[:, 4:7] = 1
    loss_mask[:, 9:11] = 1
    loss_mask[1, 9:] = 0
    adv = np.where(loss_mask > 0, np.linspace(-1.0, 1.0, UPDATE_ROWS)[:, None], 0.0).astype(np.float32)
    zeros = np.zeros((UPDATE_ROWS, UPDATE_LEN), np.float32)
    return dict(tokens_NL=tokens, valid_NL=valid, loss_mask_NL=loss_mask, advantage_NL=adv,
                old_logp_NL=zeros, ref_logp_NL=zeros - 5.0)


# Adam's step is lr·m/(√v + eps): with the default eps 1e-8 a gradient of ~1e-8 (reduced in a
# different order when sharded) swings its param by up to lr. eps 1e-3 bounds that sensitivity
# to lr/eps = 1, so params can be compared tightly; the sharded maths under test is unchanged.
UPDATE_CFG = dict(lr=1e-3, eps=1e-3, micro_batch_size=4)


def one_update(model, mesh=None, rules=sharding.DEFAULT_RULES):
    """One Updater.update step (2 micro-batches) on `update_batch_np`; with `mesh`, the batch is
    placed by the 'batch' rule (each process passing its own rows). Returns (loss, updater)."""
    from igpo_jax.runtime import distributed
    from igpo_jax.training.update import UpdateBatch, UpdateConfig, Updater

    host = update_batch_np(model.cfg.vocab_size)
    if mesh is None:
        batch = UpdateBatch(**{k: jax.numpy.asarray(v) for k, v in host.items()})
        updater = Updater(model, UpdateConfig(**UPDATE_CFG))
        return float(updater.update(batch)[0]["loss"]), updater
    spec = sharding.logical_to_spec(("batch", "length"), rules, mesh, (UPDATE_ROWS, UPDATE_LEN))
    rows = distributed.process_rows(mesh, spec, (UPDATE_ROWS, UPDATE_LEN))
    batch = UpdateBatch(**distributed.host_local_batch_to_global({k: v[rows] for k, v in host.items()}, mesh, spec))
    with sharding.activate(mesh, rules):
        updater = Updater(model, UpdateConfig(**UPDATE_CFG))
        metrics = updater.update(batch)
    return float(metrics[0]["loss"]), updater


def _host_params(model) -> list[np.ndarray]:
    from flax import nnx
    from jax.experimental import multihost_utils

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    if jax.process_count() > 1:
        leaves = multihost_utils.process_allgather(leaves, tiled=True)
    return [np.asarray(x, np.float32) for x in leaves]


def check_update(model_dir: str):
    """One update on fsdp=4 × tensor=2 equals the same update on one device."""
    assert len(jax.devices()) == 8, jax.devices()
    loss_1, _ = one_update(plain := load_hf(model_dir))
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = load_hf(model_dir, mesh=mesh, rules=sharding.DEFAULT_RULES)
    loss_8, updater = one_update(model, mesh)
    assert len(model.layers[0].mlp.up_proj[...].addressable_shards) == 8
    mu = jax.tree.leaves(updater.opt_state)[1]
    assert len(mu.sharding.device_set) == 8, mu.sharding  # moments stay sharded
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    worst = 0.0
    before = _host_params(load_hf(model_dir))
    for a, b, c in zip(_host_params(model), _host_params(plain), before):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        worst = max(worst, float(np.max(np.abs(a - b))))
    moved = max(float(np.max(np.abs(a - c))) for a, c in zip(_host_params(plain), before))
    # the layers scanned (and rematerialised), as the 7B config runs them: the same step
    scanned = load_hf(model_dir, mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=True, remat=True)
    loss_scan, _ = one_update(scanned, mesh)
    np.testing.assert_allclose(loss_scan, loss_1, rtol=1e-5)
    for a, b in zip(_host_params(scanned), _host_params(plain)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    print(f"update under fsdp=4 x tensor=2 equals one device: loss {loss_8:.8f} vs {loss_1:.8f}, "
          f"max |dparam| {worst:.2e} (step moved params by up to {moved:.2e}); scanned layers too")


def _bytes_on_device0(tree) -> int:
    dev = jax.devices()[0]
    total = 0
    for x in jax.tree.leaves(tree):
        total += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev)
    return total


def check_plan(model_dir: str):
    """Per-device bytes actually allocated on device 0 vs the planner's arithmetic; prints JSON."""
    import json

    from flax import nnx

    from igpo_jax.planning import memory
    from igpo_jax.model.kv_cache import KVCache
    from igpo_jax.training.update import UpdateConfig, make_optimizer

    assert len(jax.devices()) == 8, jax.devices()
    rules = sharding.DEFAULT_RULES
    out = []
    for shape, dtype in [({"fsdp": 4, "tensor": 2}, "float32"), ({"data": 2, "fsdp": 2, "tensor": 2}, "bfloat16"),
                         ({"fsdp": 8}, "float32")]:
        mesh = sharding.make_mesh(shape)
        model = load_hf(model_dir, mesh=mesh, rules=rules, param_dtype=dtype, dtype=dtype)
        params = nnx.state(model, nnx.Param)
        opt_state = make_optimizer(UpdateConfig()).init(params)  # as Updater does
        cache = KVCache.init(model.cfg, 8, 64, mesh=mesh, rules=rules)
        p = memory.plan(model.cfg, shape, rules, rollout_batch=8, context=64)
        out.append(dict(mesh=shape, dtype=dtype,
                        allocated=dict(params=_bytes_on_device0(params), opt_state=_bytes_on_device0(opt_state),
                                       kv_cache=_bytes_on_device0(cache)),
                        planned=dict(params=p.params, opt_state=p.opt_state, kv_cache=p.kv_cache)))
    print("PLAN " + json.dumps(out))


def check_multiprocess(model_dir: str, coordinator: str, process_id: str, out_dir: str):
    """One of two processes (4 CPU devices each): one update over the 8-device global mesh, then
    a multi-host orbax checkpoint of the params; process 0 writes loss + params to out_dir."""
    import os

    import orbax.checkpoint as ocp
    from flax import nnx

    from igpo_jax.runtime import distributed

    assert distributed.initialize(coordinator, 2, int(process_id))
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = load_hf(model_dir, mesh=mesh, rules=sharding.DEFAULT_RULES)
    loss, _ = one_update(model, mesh)
    params = _host_params(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(out_dir, "ckpt"), nnx.state(model, nnx.Param))
        ckpt.wait_until_finished()
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "result.npz"), loss=loss, *params)
    print(f"process {jax.process_index()}: loss {loss:.8f}")


def check_restore(model_dir: str, ckpt_dir: str, params_npz: str):
    """A checkpoint written by two processes restores in one (8 devices here, other shardings)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    mesh = sharding.make_mesh({"fsdp": 8})
    model = load_hf(model_dir, mesh=mesh, rules=sharding.DEFAULT_RULES)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(ckpt_dir, target)
    nnx.update(model, restored)
    expected = np.load(params_npz)
    got = _host_params(model)
    assert len(got) == len(expected.files) - 1
    for i, x in enumerate(got):
        np.testing.assert_array_equal(x, expected[f"arr_{i}"])
    print(f"restored {len(got)} arrays written by two processes")


def _logprob_loss(graphdef, mask_of, tokens, valid, weights):
    """Σ weights · log π(token | prefix) / Σ weights as a function of the params, under `mask_of`."""
    from flax import nnx

    from igpo_jax.model.attention_mask import positions_from_valid

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, positions_from_valid(valid), mask_of(valid))[0]
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        picked = jax.numpy.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return jax.numpy.sum(picked * weights) / jax.numpy.sum(weights)
    return loss


def check_sequence(model_dir: str):
    """A `sequence` mesh axis splits each row's length: loss and gradients of the update's
    log-prob forward, the information-gain scoring forward (copies mask) and one Updater step equal
    one device, with dense and with blockwise attention."""
    from flax import nnx

    from igpo_jax.igpo.scoring import block_inputs
    from igpo_jax.model import attention_mask as am

    assert len(jax.devices()) == 8, jax.devices()
    rules = sharding.DEFAULT_RULES
    host = update_batch_np(load_hf(model_dir).cfg.vocab_size)
    tokens, valid = jax.numpy.asarray(host["tokens_NL"]), jax.numpy.asarray(host["valid_NL"])
    weights = jax.numpy.asarray(host["loss_mask_NL"][:, 1:])
    # IG scoring layout: context of 8 (one row padded), 2 turns × 2 copy tokens → S = 12
    ctx_valid = np.ones((UPDATE_ROWS, 8), bool)
    ctx_valid[1, 6:] = False
    ig = [jax.numpy.asarray(x) for x in (ctx_valid, np.tile([[3, 8]], (UPDATE_ROWS, 1)).astype(np.int32),
                                         np.ones((UPDATE_ROWS, 2), bool), np.ones((UPDATE_ROWS, 2), bool))]
    ig_positions, ig_mask = block_inputs(*ig)
    ig_spec = am.copies_spec(*ig)

    def ig_loss(graphdef, mask):
        def loss(params):
            hidden, _ = nnx.merge(graphdef, params).hidden(tokens, ig_positions, mask)
            return jax.numpy.sum(hidden[:, :, :4] ** 2) / hidden.shape[0]
        return loss

    for attention in ("dense", "blockwise"):
        kw = dict(attention=attention, attention_block=4)
        graphdef, params_1 = nnx.split(load_hf(model_dir, **kw))
        cases = {"causal bool mask": _logprob_loss(graphdef, am.causal_mask, tokens, valid, weights),
                 "causal MaskSpec": _logprob_loss(graphdef, am.causal_spec, tokens, valid, weights),
                 "IG copies bool mask": ig_loss(graphdef, ig_mask), "IG copies MaskSpec": ig_loss(graphdef, ig_spec)}
        expected = {name: jax.jit(jax.value_and_grad(f))(params_1) for name, f in cases.items()}
        for shape in ({"sequence": 2}, {"fsdp": 2, "sequence": 2, "tensor": 2}):
            devices = jax.devices()[:int(np.prod(list(shape.values())))]
            mesh = sharding.make_mesh(shape, devices)
            _, params = nnx.split(load_hf(model_dir, mesh=mesh, rules=rules, **kw))
            for name, f in cases.items():
                with sharding.activate(mesh, rules):
                    jaxpr = str(jax.make_jaxpr(jax.grad(f))(params))
                    assert "all_gather" in jaxpr and "shard_map" in jaxpr, "attention did not split the length"
                    value, grads = jax.jit(jax.value_and_grad(f))(params)
                value_1, grads_1 = expected[name]
                np.testing.assert_allclose(float(value), float(value_1), rtol=1e-5)
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1)):
                    # fp32 sums in another order: within 1e-6 of the gradient's own scale
                    scale = float(np.max(np.abs(np.asarray(b))))
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6 * max(scale, 1.0), rtol=0)
            print(f"{attention}, mesh {shape}: loss and gradients equal one device ({', '.join(cases)})")
        # and one Updater step (2 micro-batches, the batch placed by the rules: rows split by length)
        loss_1, _ = one_update(plain := load_hf(model_dir, **kw))
        mesh = sharding.make_mesh({"fsdp": 2, "sequence": 2, "tensor": 2})
        model = load_hf(model_dir, mesh=mesh, rules=rules, **kw)
        loss_8, _ = one_update(model, mesh)
        np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
        for a, b in zip(_host_params(model), _host_params(plain)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        print(f"{attention}: update under fsdp=2 x sequence=2 x tensor=2 equals one device")
    print("sequence parallelism equals one device")


def check_sequence_fused(model_dir: str):
    """The cuDNN route under meshes (fused_attention.py), with the backend made to read 'cuda',
    jax.nn.dot_product_attention run by its XLA implementation and fp32 let through the route:
    rows split over fsdp call it (loss and gradients equal one device); rows split by length over
    `sequence` keep blockwise in the shards (their queries do not start at key 0) and equal it too."""
    from flax import nnx

    from igpo_jax.model import attention_mask as am
    from igpo_jax.model import fused_attention

    calls = []
    real = jax.nn.dot_product_attention

    def on_the_cpu(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    jax.nn.dot_product_attention = on_the_cpu
    fused_attention.platform = lambda: "cuda"
    fused_attention.CUDNN_DTYPES = ("float32",)
    rules = sharding.DEFAULT_RULES
    host = update_batch_np(load_hf(model_dir).cfg.vocab_size)
    tokens, valid = jax.numpy.asarray(host["tokens_NL"]), jax.numpy.asarray(host["valid_NL"])  # right-padded
    weights = jax.numpy.asarray(host["loss_mask_NL"][:, 1:])
    kw = dict(attention="blockwise", attention_block=4, gpu_fused_attention=True)
    mask_of = lambda v: am.causal_spec(v, right_padded=True)
    graphdef, params_1 = nnx.split(load_hf(model_dir, **kw))
    value_1, grads_1 = jax.jit(jax.value_and_grad(_logprob_loss(graphdef, mask_of, tokens, valid, weights)))(params_1)
    layers = load_hf(model_dir).cfg.num_layers
    assert calls == ["cudnn"] * layers, calls
    for shape, fused in (({"fsdp": 2}, True), ({"sequence": 2}, False), ({"fsdp": 2, "sequence": 2, "tensor": 2}, False)):
        calls.clear()
        mesh = sharding.make_mesh(shape, jax.devices()[:int(np.prod(list(shape.values())))])
        graphdef, params = nnx.split(load_hf(model_dir, mesh=mesh, rules=rules, **kw))
        with sharding.activate(mesh, rules):
            value, grads = jax.jit(jax.value_and_grad(_logprob_loss(graphdef, mask_of, tokens, valid, weights)))(params)
        assert calls == (["cudnn"] * layers if fused else []), (shape, calls)
        np.testing.assert_allclose(float(value), float(value_1), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1)):
            scale = float(np.max(np.abs(np.asarray(b))))
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6 * max(scale, 1.0), rtol=0)
        print(f"mesh {shape}: {'cuDNN route' if fused else 'blockwise in the shards'}, equals one device")
    print("fused route under meshes equals one device")


if __name__ == "__main__":
    {"sampling": check_sampling, "update": check_update, "plan": check_plan,
     "multiprocess": check_multiprocess, "restore": check_restore, "sequence": check_sequence,
     "sequence_fused": check_sequence_fused}[sys.argv[1]](*sys.argv[2:])
