"""XLA's own per-device memory for the programs a config's training step runs, from abstract shapes.

`plan.py --compile` lowers and compiles, for the config's mesh (simulated CPU devices are fine:
`jax_num_cpu_devices`), with `jax.ShapeDtypeStruct` inputs carrying their shardings (no weights
allocated):
  decode   `sampler.decode_loop` (the sampler's jitted decode steps) over the KV cache of
           `concurrent_rows` × context slots, from the sampling copy
  scoring  `scoring.one_pass_mean_logp` (all turns' gold-answer log-probs and π_old's token
           log-probs in one forward) over `scoring_rows` rows
  update   `update.summed_gradients` (the π_θ forward + backward of one micro-batch, float32
           gradients) for one micro-batch (padded rows, or one packed row of the token budget per
           device)
and reads `compiled.memory_analysis()`: arguments + outputs + temporaries − aliased (donated)
bytes. Arrays that live across the step but are not inputs of a program (optimiser state, the
reference policy, the sampling copy, the update rows) are added from the plan's exact sizes.

The model is compiled whole, never extrapolated from fewer layers: a program's memory is not
linear in its layer count (the decode loop's hoisted weight gathers overtake its vocab-projection
gather only past a few layers; the update's gradient all-reduces are combined up to 256 arrays, so
their size grows with the layers until a group is full). Extrapolated from 1 and 2 layers,
Qwen2.5-7B's decode program came out at 20.2 GB and its update at 63.4 GB; compiled whole they are
31.4 GB and 68.3 GB (layers unrolled; scanned, as the config now runs them, the update is
38.8 GB). Whole, the 7B's three programs compile in about two minutes on 2 CPU cores (1.1-1.3 GB
resident).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from igpo_jax.runtime import sharding
from igpo_jax.igpo.scoring import one_pass_mean_logp
from igpo_jax.model.kv_cache import KVCache
from igpo_jax.model.qwen import abstract_decoder
from igpo_jax.planning.memory import PSEUDO_TURN_TOKENS, Plan, Settings
from igpo_jax.rollout.sampler import DecodeRows, SamplingParams, decode_loop
from igpo_jax.training.update import UpdateBatch, UpdateConfig, summed_gradients

DECODE_STEPS = 8


@dataclasses.dataclass(frozen=True)
class Compiled:
    decode: int  # per-device bytes of each program (arguments + outputs + temporaries − aliased)
    scoring: int
    update: int
    layers_compiled: tuple[int, ...]  # (L,): the layers compiled (the model's own)
    seconds: float

    def peak(self, p: Plan) -> int:
        """The step's peak: each program plus what lives beside it (from the plan's exact sizes)."""
        beside_decode = p.params + p.opt_state + p.reference  # the program holds the sampling copy
        beside_scoring = p.opt_state + p.reference + p.rollout_copy
        beside_update = p.opt_state + p.reference + p.rollout_copy + p.update_batch
        return max(beside_decode + self.decode, beside_scoring + self.scoring, beside_update + self.update)


def program_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _abstract_state(cfg, mesh, rules):
    """(graphdef, nnx.State of ShapeDtypeStructs with their NamedShardings)."""
    graphdef, state = nnx.split(abstract_decoder(cfg))

    def place(var):
        value = var.get_value()
        axes = var.get_metadata().get("axes")
        spec = sharding.logical_to_spec(axes, rules, mesh, value.shape) if axes is not None else PartitionSpec()
        return var.replace(value=jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))

    return graphdef, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _sds(shape, dtype, mesh, rules, axes):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.named_sharding(mesh, rules, axes, shape))


def _batch_rows(rows: int, mesh, rules) -> int:
    """`rows` rounded up to a multiple of the devices the batch axis is split over."""
    entry = sharding.logical_to_spec(("batch",), rules, mesh, (1 << 20,))[0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    shards = 1
    for name in names:
        shards *= mesh.shape[name]
    return max(shards, -(-rows // shards) * shards)


def compile_decode(cfg, st: Settings, mesh, rules) -> int:
    dtype = st.rollout_dtype or cfg.dtype
    sample_cfg = cfg if (st.rollout_dtype is None or cfg.param_dtype == cfg.dtype == dtype) else \
        cfg.replace(param_dtype=dtype, dtype=dtype)
    graphdef, state = _abstract_state(sample_cfg, mesh, rules)
    b = _batch_rows(st.concurrent_rows, mesh, rules)
    cache = jax.eval_shape(lambda: KVCache.init(sample_cfg, b, st.context, dtype))
    axes = lambda x: (("batch", "kv_heads", "cache_length", "head_dim") if x.ndim == 4 else
                      ("batch", "cache_length") if x.ndim == 2 else ("batch",) if x.ndim == 1 else ())
    cache = jax.tree.map(lambda x: _sds(x.shape, x.dtype, mesh, rules, axes(x)), cache)
    row = lambda dtype: _sds((b,), dtype, mesh, rules, ("batch",))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    rows = DecodeRows(row(jnp.int32), row(jnp.bool_), row(jnp.int32), row(jnp.int32),
                 jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=sharding.named_sharding(mesh, rules, ("batch",), keys.shape)))
    stop = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    table = jax.ShapeDtypeStruct((cfg.vocab_size,), jnp.bool_, sharding=NamedSharding(mesh, PartitionSpec()))
    fn = jax.jit(decode_loop, static_argnums=(0, 6, 7), donate_argnums=(2,))
    with sharding.activate(mesh, rules):
        return program_bytes(fn.lower(graphdef, state, cache, rows, stop, table, SamplingParams(), DECODE_STEPS).compile())


def compile_scoring(cfg, st: Settings, mesh, rules, chunk: int = 128) -> int:
    graphdef, state = _abstract_state(cfg, mesh, rules)
    b = _batch_rows(st.scoring_rows, mesh, rules)
    c, t, p, a = st.context, (st.scoring_len - st.context) // PSEUDO_TURN_TOKENS, PSEUDO_TURN_TOKENS, 16
    arr = lambda n, dtype: _sds((b, n), dtype, mesh, rules, ("batch", None))
    args = (arr(c, jnp.int32), arr(c, jnp.bool_), arr(t, jnp.int32), arr(t, jnp.bool_), arr(p, jnp.int32),
            arr(p, jnp.bool_), arr(a, jnp.int32), arr(a, jnp.int32), arr(a, jnp.bool_), arr(c, jnp.bool_))
    fn = jax.jit(lambda state, *xs: one_pass_mean_logp(nnx.merge(graphdef, state), *xs, chunk=chunk))
    with sharding.activate(mesh, rules):
        return program_bytes(fn.lower(state, *args).compile())


def compile_update(cfg, st: Settings, mesh, rules, loss_agg_mode: str = "seq-mean-token-mean") -> int:
    graphdef, state = _abstract_state(cfg, mesh, rules)
    if st.micro_tokens:
        b, t = _batch_rows(1, mesh, rules), st.micro_tokens  # one packed row of the budget per device
    else:
        b, t = _batch_rows(st.micro_rows, mesh, rules), st.context
    arr = lambda dtype: _sds((b, t), dtype, mesh, rules, ("batch", None))
    batch = UpdateBatch(arr(jnp.int32), arr(jnp.bool_), arr(jnp.float32), arr(jnp.float32), arr(jnp.float32),
                        arr(jnp.float32))
    # seq-mean-token-sum-norm needs its constant C; any value compiles the same program
    ucfg = UpdateConfig(use_kl_loss=st.with_reference, loss_agg_mode=loss_agg_mode, loss_scale_factor=1.0)
    fn = jax.jit(summed_gradients, static_argnums=(0, 3, 4, 6))  # as update._gradients_fp32
    with sharding.activate(mesh, rules):
        return program_bytes(fn.lower(graphdef, state, batch, ucfg, 1, False, None).compile())


def compile_all(cfg, st: Settings, mesh_shape, rules=sharding.DEFAULT_RULES, loss_agg_mode="seq-mean-token-mean",
                log=print) -> Compiled:
    """The three programs' per-device bytes for the config's mesh (of real CPU devices, simulated)."""
    devices = jax.devices()
    need = 1
    for v in mesh_shape.values():
        need *= v
    if len(devices) < need:
        raise RuntimeError(f"--compile needs {need} devices for mesh {dict(mesh_shape)}, JAX has {len(devices)}: "
                           f"start with XLA_FLAGS=--xla_force_host_platform_device_count={need} (the planner "
                           f"sets it itself when it starts JAX)")
    mesh = sharding.make_mesh(mesh_shape, devices[:need])
    start = time.perf_counter()
    sizes = {}
    for name, fn in (("decode", compile_decode), ("scoring", compile_scoring), ("update", compile_update)):
        t0 = time.perf_counter()
        sizes[name] = fn(cfg, st, mesh, rules) if name != "update" else fn(cfg, st, mesh, rules, loss_agg_mode)
        log(f"  compiled {name} ({cfg.num_layers} layers): {sizes[name] / 1e9:.3f} GB per device "
            f"({time.perf_counter() - t0:.0f} s)")
    return Compiled(sizes["decode"], sizes["scoring"], sizes["update"], (cfg.num_layers,), time.perf_counter() - start)
