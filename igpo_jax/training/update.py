"""The policy update: log-probs of π_old / π_ref, then mini-batched, micro-batch-accumulated
clipped-loss steps with AdamW (IGPO_SPEC §4).

Legend: N rollouts in the update batch, M rows per mini-batch, U rows per micro-batch, L tokens.

Shared prompt prefix (`layout`, a `shared_prefix.PrefixLayout`; `UpdateBatch.prefix_len_N`): the
π_θ forward and backward (and `compute_logprobs`) compute each group's prompt once for its G
rows (model/shared_prefix.py); mini- and micro-batches then hold whole groups (micro-batch j:
groups j, j + num_micro, …). Without a layout every row runs on its own.

Token alignment: `logp_NL[:, j]` is log π(tokens[:, j] | tokens[:, :j]) (column 0 is 0), so the
loss mask, advantages and log-probs all index the token they score.

One `train_step` call is one optimiser step over one mini-batch. Its micro-batches (strided
row subsets, see `micro_batches`) run in a `lax.scan` that sums their gradients in float32; each
micro-batch loss is aggregated with the mini-batch's token and sequence counts, so the sum is
exactly the mini-batch loss whatever the split. A non-finite loss or gradient norm leaves params
and optimiser state untouched (`skipped` = 1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from igpo_jax.training import packing
from igpo_jax.igpo.loss import aggregation_weights, policy_loss
from igpo_jax.model import shared_prefix
from igpo_jax.model.attention_mask import causal_mask, causal_spec, positions_from_valid
from igpo_jax.model.token_logprobs import logprobs_from_hidden
from igpo_jax.training import leafwise, row_selection
from igpo_jax.runtime.sharding import constrain
from igpo_jax.runtime.xla_flags import FP32_TRAIN_STEP_COMPILER_OPTIONS


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 0  # > 0 with schedule='cosine'
    schedule: str = "constant"  # 'constant' | 'cosine' (both after the linear warmup)
    ppo_mini_batch_size: int = 0  # rows per optimiser step; 0 → the whole batch
    micro_batch_size: int = 0  # rows per forward/backward; 0 → the whole mini-batch
    # > 0: micro-batches packed to this many tokens (packing.py; micro_batch_size unused)
    max_tokens_per_micro_batch: int = 0
    ppo_epochs: int = 1
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    use_kl_loss: bool = True
    kl_coef: float = 0.001
    kl_estimator: str = "low_var_kl"
    entropy_coeff: float = 0.0
    loss_agg_mode: str = "token-mean"
    # C of 'seq-mean-token-sum-norm' (each sequence's token sum / C): a constant of the run, so the
    # gradient's scale does not follow each batch's longest row; required > 0 in that mode
    # (train.update_config: actor.loss_scale_factor, 0 → max_turns × max_new_tokens)
    loss_scale_factor: float = 0.0
    logprob_chunk: int = 128  # positions per chunk of the vocab projection
    entropy_metric: bool = True  # report the policy entropy even when entropy_coeff = 0

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.schedule == "cosine" and self.total_steps <= 0:
            raise ValueError("schedule='cosine' needs total_steps > 0")
        if self.micro_batch_size and self.ppo_mini_batch_size and self.ppo_mini_batch_size % self.micro_batch_size:
            raise ValueError(f"ppo_mini_batch_size={self.ppo_mini_batch_size} is not a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        if self.loss_scale_factor < 0:
            raise ValueError(f"loss_scale_factor={self.loss_scale_factor} must be ≥ 0")
        if self.loss_agg_mode == "seq-mean-token-sum-norm" and self.loss_scale_factor <= 0:
            raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' needs loss_scale_factor > 0: the constant "
                             "each sequence's token sum is divided by (e.g. the most tokens an episode generates)")


def learning_rate_schedule(cfg: UpdateConfig) -> optax.Schedule:
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 0), cfg.total_steps)
    if cfg.warmup_steps > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                     optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return optax.constant_schedule(cfg.lr)


def _as_float32(tree):
    """Floating leaves as float32; integer/bool leaves (and None) as they are."""
    def cast(x):
        return jnp.asarray(x, jnp.float32) if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, tree)


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run on float32 copies of the gradients and params, its updates cast back to each
    param's dtype. So its state (Adam's mu *and* nu) is float32 even for bf16 params: optax's
    `mu_dtype` covers only mu, and a bf16 nu (8 mantissa bits) cannot hold the running mean of
    g² that Adam divides by. The state's structure is `inner`'s own, so checkpoints do not change."""

    def init(params):
        return inner.init(_as_float32(params))

    def update(updates, state, params=None):
        new_updates, new_state = inner.update(_as_float32(updates), state, _as_float32(params))
        return jax.tree.map(lambda u, like: u.astype(like.dtype), new_updates, updates), new_state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: UpdateConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule (the reference's optimiser), whose
    moments are float32 whatever the param dtype."""
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), _adamw(cfg))


def _adamw(cfg: UpdateConfig) -> optax.GradientTransformation:
    return in_float32(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay))


def _optimiser_leaf_step(grad, leaf_state, param, grad_norm, finite, cfg: UpdateConfig):
    """One parameter leaf's share of `make_optimizer(cfg).update` and `optax.apply_updates`, given
    the gradients' global norm (optax's clip_by_global_norm, then AdamW, then the update added);
    the leaf unchanged when the loss or the norm is not finite."""
    def step(state):
        param, (clip_state, adamw_state) = state
        clipped = jax.lax.select(grad_norm < cfg.grad_clip, grad,
                                 (grad / grad_norm.astype(grad.dtype)) * cfg.grad_clip)
        update, adamw_state = _adamw(cfg).update(clipped, adamw_state, param)
        return optax.apply_updates(param, update), (clip_state, adamw_state)

    return jax.lax.cond(finite, step, lambda state: state, (param, leaf_state))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UpdateBatch:
    tokens_NL: jax.Array  # int32
    valid_NL: jax.Array  # bool
    loss_mask_NL: jax.Array  # float32 (0/1)
    advantage_NL: jax.Array  # float32
    # float32, log π_old of each loss token; None when the update takes one optimiser step, whose
    # π_old is π_θ itself (`use_current_as_old`: ρ = 1 exactly, no forward needed)
    old_logp_NL: jax.Array | None
    ref_logp_NL: jax.Array  # float32, log π_ref (zeros when the KL loss is off)
    # int32: the row's group's shared prefix length (shared_prefix.group_prefix_lengths), with a
    # `layout`; None: no prefix sharing
    prefix_len_N: jax.Array | None = None
    # float32: how many rows of the mini-batch each row stands for (row_selection.py: identical
    # rows computed once); 0: padding, not computed; None: 1 each
    weight_N: jax.Array | None = None


def optimiser_steps(cfg: UpdateConfig, num_rows: int) -> int:
    """Optimiser steps one `Updater.update` of `num_rows` rows takes: epochs × mini-batches."""
    return cfg.ppo_epochs * (num_rows // (cfg.ppo_mini_batch_size or num_rows))


def token_logprobs(model, tokens_NL, valid_NL, chunk: int, with_entropy: bool = False, needed_NL=None):
    """(logp_NL, entropy_NL): log π(token j | tokens < j) at column j; column 0 is 0. Rows must be
    right-padded where cuDNN's kernel may run (model.gpu_fused_attention on an NVIDIA GPU: a row that
    is not reads NaN); the dense and blockwise kernels take any padding.

    `needed_NL` (optional, e.g. the loss mask): only those columns are computed, the rest read 0;
    the vocab projection then costs ∝ the loss tokens (prompts and tool results are skipped)."""
    valid_NL = valid_NL.astype(bool)
    # blockwise attention reads the O(L) mask per block; the dense path keeps its fused bool mask.
    # The update's rows are right-padded (Trajectories: a row's tokens are its first ones), which
    # lets a GPU run cuDNN's fused attention on them (fused_attention.py)
    mask = causal_spec(valid_NL, right_padded=True) if model.cfg.attention == "blockwise" else causal_mask(valid_NL)
    hidden, _ = model.hidden(tokens_NL, positions_from_valid(valid_NL), mask)
    needed = None if needed_NL is None else needed_NL[:, 1:].astype(bool)
    logp, entropy = logprobs_from_hidden(model, hidden[:, :-1], tokens_NL[:, 1:], chunk, with_entropy, needed)
    pad = ((0, 0), (1, 0))
    return jnp.pad(logp, pad), jnp.pad(entropy, pad)


def policy_logprobs(model, batch: UpdateBatch, layout, chunk: int, with_entropy: bool = False, needed_NL=None):
    """`token_logprobs` of the batch's rows, through their shared prefixes when `layout` is given."""
    if layout is None:
        return token_logprobs(model, batch.tokens_NL, batch.valid_NL, chunk, with_entropy, needed_NL)
    return shared_prefix.token_logprobs(model, batch.tokens_NL, batch.valid_NL, batch.prefix_len_N, layout, chunk,
                                        with_entropy, needed_NL)


def micro_batches(x, num_micro: int):
    """[N, ...] → [num_micro, N / num_micro, ...], micro-batch j taking rows j, j + num_micro, … .

    Strided rather than contiguous, so that when the N rows are split over devices (data
    parallelism, contiguous blocks per device) every micro-batch takes its rows evenly from every
    device's block and the loop over micro-batches runs with no data moving between devices."""
    return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)


def from_micro_batches(x):
    """The inverse of `micro_batches`: rows back in their original order."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _split(x, num_micro: int, layout):
    """`micro_batches` of rows, or with a `layout` of whole groups (G consecutive rows each)."""
    if layout is None:
        return micro_batches(x, num_micro)
    g = layout.group_size
    grouped = micro_batches(x.reshape(x.shape[0] // g, g, *x.shape[1:]), num_micro)
    return grouped.reshape(num_micro, grouped.shape[1] * g, *x.shape[1:])


def _unsplit(x, layout):
    """The inverse of `_split`."""
    if layout is None:
        return from_micro_batches(x)
    g = layout.group_size
    return from_micro_batches(x.reshape(x.shape[0], x.shape[1] // g, g, *x.shape[2:])).reshape(-1, *x.shape[2:])


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _logprobs_call(graphdef, params, num_micro, chunk, layout, rows: UpdateBatch, needed_NL):
    """Log-probs [N, L] of `rows` in `num_micro` micro-batches; micro-batches after the last one
    with a row of weight > 0 (padding only, row_selection.py) are not computed and read 0."""
    model = nnx.merge(graphdef, params)
    micro = jax.tree.map(lambda x: _split(x, num_micro, layout), (rows, needed_NL))

    def forward(i, out):
        m = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), micro)
        return out.at[i].set(policy_logprobs(model, m[0], layout, chunk, needed_NL=m[1])[0].astype(out.dtype))

    out = jnp.zeros(micro[0].tokens_NL.shape, jnp.float32)
    weights = micro[0].weight_N
    logp = jax.lax.fori_loop(0, _micro_batches_to_run(weights[..., None]), forward, out)
    return _unsplit(logp, layout)


@jax.jit
def _expand(values_UL, slot_N):
    """Each row's values from its computed copy's (0 for rows not computed)."""
    return jnp.where((slot_N >= 0)[:, None], values_UL[jnp.maximum(slot_N, 0)], 0.0)


def compute_logprobs(model, tokens_NL, valid_NL, micro_batch_size: int = 0, chunk: int = 128, prefix_len_N=None,
                     layout=None, needed_NL=None, selection: row_selection.Selection | None = None) -> jax.Array:
    """Log-probs of every token under `model` (π_old or π_ref), `micro_batch_size` rows per forward
    (whole groups with a shared-prefix `layout` and `prefix_len_N`); with `needed_NL`, of those
    tokens only (the others read 0). With a `selection` (row_selection.select over all N rows),
    only its rows are computed, each identical row's log-probs copied from its computed one.

    One jitted call that stays on device: with global arrays sharded over several processes (no
    process holds all rows) the result is a global array laid out like the batch, ready for the
    update; nothing is fetched to the host.
    """
    graphdef, params = nnx.split(model)
    n = tokens_NL.shape[0]
    micro = micro_batch_size or n
    if n % micro:
        raise ValueError(f"{n} rows do not split into micro-batches of {micro}")
    if layout is not None and micro % layout.group_size:
        raise ValueError(f"micro-batches of {micro} rows do not hold whole groups of {layout.group_size}")
    rows = UpdateBatch(tokens_NL, valid_NL, None, None, None, None, prefix_len_N if layout is not None else None,
                       jnp.ones((n,), jnp.float32))
    if selection is None:
        return _logprobs_call(graphdef, params, n // micro, chunk, layout, rows, needed_NL)
    picked = _rows_of((rows, needed_NL), jax.device_put(selection.rows_U))
    picked = (dataclasses.replace(picked[0], weight_N=jnp.asarray(selection.weight_U)), picked[1])
    logp = _logprobs_call(graphdef, params, n // micro, chunk, _with_group_size(layout, selection), *picked)
    return _expand(logp, jnp.asarray(selection.slot_M))


def _with_group_size(layout, selection: row_selection.Selection):
    """The shared-prefix layout of a selection's groups (G_u rows each), or None."""
    return None if layout is None else dataclasses.replace(layout, group_size=selection.group_size)


def _with_entropy(cfg: UpdateConfig) -> bool:
    return cfg.entropy_coeff != 0 or cfg.entropy_metric


def _loss_of_logprobs(logp, entropy, micro, counted_NL, cfg: UpdateConfig, use_current_as_old: bool, token_weight_BL):
    """The policy loss of a micro-batch's log-probs (padded or packed rows alike): Σ token weight ·
    token loss; metrics over the counted tokens."""
    if cfg.entropy_coeff == 0:
        entropy = jax.lax.stop_gradient(entropy)  # a metric only: no backward pass through it
    if micro.old_logp_NL is None:  # only valid where use_current_as_old (Updater checks)
        old = jax.lax.stop_gradient(logp)
    else:  # a traced flag, not a static one: the first mini-batch and the others share one program
        old = jnp.where(use_current_as_old, jax.lax.stop_gradient(logp), micro.old_logp_NL)
    return policy_loss(
        logp, old, micro.advantage_NL, counted_NL,
        ref_logp_BL=micro.ref_logp_NL if cfg.use_kl_loss else None,
        entropy_BL=entropy if _with_entropy(cfg) else None,
        clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high, clip_ratio_c=cfg.clip_ratio_c,
        kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, entropy_coeff=cfg.entropy_coeff,
        token_weight_BL=token_weight_BL)


def _micro_loss(params, graphdef, micro: UpdateBatch, cfg: UpdateConfig, use_current_as_old: bool, layout=None):
    """A micro-batch's share of the mini-batch loss: Σ token weight · token loss (`loss_weight_NL`,
    set by `summed_gradients` from the mini-batch's aggregation); metrics are token means over
    the loss mask, each row counted as often as it stands for rows (`counted_NL`)."""
    model = nnx.merge(graphdef, params)
    batch, loss_weight_NL, counted_NL = micro
    logp, entropy = policy_logprobs(model, batch, layout, cfg.logprob_chunk, _with_entropy(cfg),
                                    batch.loss_mask_NL > 0)
    return _loss_of_logprobs(logp, entropy, batch, counted_NL, cfg, use_current_as_old, token_weight_BL=loss_weight_NL)


def _scan_gradients(loss_of_micro, params, micro):
    """Loss, float32 gradients and metrics of `loss_of_micro(params, m)` summed over the
    micro-batches m of `micro` = (rows, loss weights, counted tokens), stacked on a leading axis,
    in a loop: one micro-batch's activations live at a time. The loop stops after the last
    micro-batch with anything counted: the ones after it hold padding rows only
    (row_selection.py places them last), whose loss and gradient are exactly 0."""
    grad_fn = jax.value_and_grad(loss_of_micro, has_aux=True)
    computed_tokens = jnp.maximum(jnp.sum(micro[2]), 1.0)

    def accumulate(i, carry):
        grads, loss_sum, metric_sums = carry
        m = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), micro)
        (loss, metrics), g = grad_fn(params, m)
        # losses are already aggregated with the mini-batch's weights (they sum); the other metrics
        # are token means of this micro-batch, weighted here by its share of the computed tokens
        weight = jnp.sum(m[2]) / computed_tokens
        metrics = {k: v if k.endswith("loss") else v * weight for k, v in metrics.items()}
        grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
        return grads, loss_sum + loss, jax.tree.map(jnp.add, metric_sums, metrics)

    # float32 accumulator: summing bf16 micro-batch gradients would round at every addition
    zeros = _float32_zeros_like(params)
    first = jax.tree.map(lambda x: x[0], micro)
    loss_shape, metric_shapes = jax.eval_shape(loss_of_micro, params, first)
    zero = lambda s: jnp.zeros(s.shape, jnp.float32)
    # a while loop with a traced trip count: as lax.scan's own loop, without the padding's iterations
    grads, loss, metrics = jax.lax.fori_loop(0, _micro_batches_to_run(micro[2]), accumulate,
                                             (zeros, zero(loss_shape), jax.tree.map(zero, metric_shapes)))
    return loss, grads, metrics


def _micro_batches_to_run(counted_MUL):
    """1 + the index of the last micro-batch with a counted token (0 when none has one)."""
    nonempty = jnp.any(counted_MUL.reshape(counted_MUL.shape[0], -1) > 0, axis=1)
    return jnp.max(jnp.where(nonempty, jnp.arange(nonempty.shape[0]) + 1, 0))


def loss_weights(batch: UpdateBatch, cfg: UpdateConfig, totals=None):
    """(loss weight, counted) per token of a mini-batch: `loss.aggregation_weights` with each row's
    multiplicity (`weight_N`) and the totals of the whole mini-batch (`totals` = (tokens,
    sequences), for rows that are not computed; None: counted from these rows); counted = loss
    mask × multiplicity, for the metrics."""
    mask = batch.loss_mask_NL.astype(jnp.float32)
    rows = jnp.ones(mask.shape[:1], jnp.float32) if batch.weight_N is None else batch.weight_N
    num_tokens, num_seqs = (None, None) if totals is None else totals
    weights = aggregation_weights(mask, cfg.loss_agg_mode, loss_scale_factor=cfg.loss_scale_factor,
                                  row_weight_B=rows, num_tokens=num_tokens, num_seqs=num_seqs)
    return weights, mask * rows[:, None]


def _float32_zeros_like(params):
    """A float32 zero per param, constrained to the param's logical sharding (when a mesh is active):
    left to XLA, the gradient accumulator came out replicated, a full float32 copy of the model on
    every device under fsdp (plan --compile measured it: 30 GB per device for 7B on fsdp=8)."""
    def zeros(v):
        value = jnp.zeros(v.get_value().shape, jnp.float32)
        axes = v.get_metadata().get("axes")
        return v.replace(value=value if axes is None else constrain(value, axes))

    return jax.tree.map(zeros, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def summed_gradients(graphdef, params, batch: UpdateBatch, cfg: UpdateConfig, num_micro: int,
                     use_current_as_old: bool, layout=None, totals=None):
    """Loss, float32 gradients and metrics of one mini-batch, summed over its micro-batches
    (`totals`: see `loss_weights`)."""
    weights, counted = loss_weights(batch, cfg, totals)
    micro = jax.tree.map(lambda x: _split(x, num_micro, layout), (batch, weights, counted))
    loss_of_micro = lambda p, m: _micro_loss(p, graphdef, m, cfg, use_current_as_old, layout)
    return _scan_gradients(loss_of_micro, params, micro)


# the CPU compiler option sped up the fp32 train step and slowed the bf16 one (xla_flags.py).
# use_current_as_old (argument 5) is traced: one program for every mini-batch, where a static flag
# built, loaded and traced the largest program of a run twice (a warm start-up spent ~7 s CPU
# deserialising each copy, and as long again tracing it)
_gradients_fp32 = jax.jit(summed_gradients, static_argnums=(0, 3, 4, 6),
                          compiler_options=FP32_TRAIN_STEP_COMPILER_OPTIONS)
_gradients_other = jax.jit(summed_gradients, static_argnums=(0, 3, 4, 6))


def _gradient_program(graphdef, params):
    """The jitted `summed_gradients` compiled for the model's compute dtype."""
    return _gradients_fp32 if nnx.merge(graphdef, params).cfg.dtype == "float32" else _gradients_other


# ---------------------------------------------------------------- token-budget (packed) micro-batches

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Micro-batches of packed rows, [num_micro, R, W] (packing.py): W tokens per packed row."""
    tokens_NL: jax.Array
    valid_NL: jax.Array
    segment_NL: jax.Array
    position_NL: jax.Array
    loss_mask_NL: jax.Array  # 0/1
    counted_NL: jax.Array  # loss mask × the row's multiplicity: the metrics' token weights
    weight_NL: jax.Array  # the mini-batch's loss weights (`loss_weights`): the loss is Σ weight · token loss
    advantage_NL: jax.Array
    old_logp_NL: jax.Array | None
    ref_logp_NL: jax.Array


def packed_micro_batches(batch: UpdateBatch, cfg: UpdateConfig, budget: int, rows_per_micro: int = 1,
                         totals=None) -> PackedBatch:
    """A mini-batch's rows packed into micro-batches (host-side packing; a single process holds its
    rows): their tokens in rows of `budget` tokens, `rows_per_micro` packed rows per micro-batch
    (one per device the batch is split over). Rows of weight 0 (`weight_N`: padding) are left
    out; the loss weights are the mini-batch's (`loss_weights`, with `totals`)."""
    keep = np.ones(batch.tokens_NL.shape[0], bool) if batch.weight_N is None else np.asarray(batch.weight_N) > 0
    weight, counted = (np.asarray(x) for x in loss_weights(batch, cfg, totals))
    mask = np.asarray(batch.loss_mask_NL, np.float32)
    layout = packing.plan_packing(np.asarray(batch.valid_NL).astype(bool)[keep], budget, rows_per_micro,
                                  needed_NL=mask[keep] > 0)
    group = lambda x: jnp.asarray(x.reshape(-1, rows_per_micro, budget))
    pk = lambda x: group(packing.pack(np.asarray(x)[keep], layout))
    return PackedBatch(pk(batch.tokens_NL), group(layout.valid_PW), group(layout.segment_PW), group(layout.position_PW),
                       pk(mask), pk(counted), pk(weight), pk(batch.advantage_NL),
                       None if batch.old_logp_NL is None else pk(batch.old_logp_NL), pk(batch.ref_logp_NL))


def _packed_micro_loss(params, graphdef, micro: PackedBatch, cfg: UpdateConfig, use_current_as_old: bool):
    model = nnx.merge(graphdef, params)
    logp, entropy = packing.token_logprobs(model, micro.tokens_NL, micro.segment_NL, micro.position_NL,
                                           micro.valid_NL, cfg.logprob_chunk, _with_entropy(cfg),
                                           micro.loss_mask_NL > 0)
    return _loss_of_logprobs(logp, entropy, micro, micro.counted_NL, cfg, use_current_as_old,
                             token_weight_BL=micro.weight_NL)


@functools.partial(jax.jit, static_argnums=(0, 3))  # use_current_as_old traced, as in _gradients_fp32
def summed_packed_gradients(graphdef, params, micro: PackedBatch, cfg: UpdateConfig, use_current_as_old: bool):
    """`summed_gradients` over packed micro-batches (already split: [num_micro, R, W])."""
    loss_of_micro = lambda p, m: _packed_micro_loss(p, graphdef, m[0], cfg, use_current_as_old)
    return _scan_gradients(loss_of_micro, params, (micro, micro.weight_NL, micro.counted_NL))


def packed_train_step(graphdef, params, opt_state, batch: UpdateBatch, cfg: UpdateConfig,
                      use_current_as_old: bool = False, rows_per_micro: int = 1, totals=None):
    """`train_step` with the mini-batch packed into micro-batches of cfg.max_tokens_per_micro_batch
    tokens per packed row (the same loss and gradients; packing.py)."""
    micro = packed_micro_batches(batch, cfg, cfg.max_tokens_per_micro_batch, rows_per_micro, totals)
    loss, grads, metrics = summed_packed_gradients(graphdef, params, micro, cfg, use_current_as_old)
    params, opt_state, step_metrics = _apply_gradients(params, opt_state, grads, loss, cfg)
    return params, opt_state, {**metrics, **step_metrics}


@functools.partial(jax.jit, static_argnums=(3,))
def _finite_and_lr(loss, grad_norm, count, cfg: UpdateConfig):
    """(whether the step applies, 1.0 where it is skipped, its learning rate): a skipped step
    leaves every leaf as it was."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return finite, (~finite).astype(jnp.float32), learning_rate_schedule(cfg)(count)


# which program applies the optimiser step (bench/results/train_step.md measured both):
# 'auto': the leaf-by-leaf programs until the one program for the whole tree, built on a
# background thread from the second step of a signature on, is ready, then that one;
# 'leafwise' / 'fused': always the one. Every path gives the same update, bit for bit.
OPTIMISER_PROGRAM = "auto"


def _apply_gradients(params, opt_state, grads, loss, cfg: UpdateConfig):
    """AdamW step with clipping, or nothing when the loss or the gradient norm is not finite;
    `params` and `opt_state` are donated.

    Two programs of the same arithmetic: leaf by leaf, each leaf a small program dispatched from
    Python (leafwise.py), which is quick to build and load (one program for the whole tree was the
    slowest of a warm start to load), and that whole-tree program, which takes half the time per
    step (no ~550 dispatches). A run starts on the first and moves to the second once a
    background thread has built it (`OPTIMISER_PROGRAM`)."""
    if OPTIMISER_PROGRAM == "fused":
        return _apply_gradients_fused(params, opt_state, grads, loss, cfg)
    if OPTIMISER_PROGRAM == "auto":
        fused = _fused_when_ready.get(params, opt_state, grads, loss, cfg)
        if fused is not None:
            return fused(params, opt_state, grads, loss)
    elif OPTIMISER_PROGRAM != "leafwise":
        raise ValueError(f"OPTIMISER_PROGRAM must be 'auto', 'leafwise' or 'fused', got {OPTIMISER_PROGRAM!r}")
    return _apply_gradients_leafwise(params, opt_state, grads, loss, cfg)


def _apply_gradients_leafwise(params, opt_state, grads, loss, cfg: UpdateConfig):
    """`_apply_gradients` leaf by leaf, each leaf's step a small program (leafwise.py)."""
    grad_norm = leafwise.global_norm(grads)
    finite, skipped, lr = _finite_and_lr(loss, grad_norm, opt_state[1][0].count, cfg)  # Adam's step counter
    params, opt_state = leafwise.update(_optimiser_leaf_step, grads, opt_state, params, grad_norm, finite,
                                        static=cfg)
    return params, opt_state, dict(grad_norm=grad_norm, skipped=skipped, lr=lr)


@functools.partial(jax.jit, static_argnums=(4,), donate_argnums=(0, 1))
def _apply_gradients_fused(params, opt_state, grads, loss, cfg: UpdateConfig):
    """`_apply_gradients_leafwise` as one program: the same leaf steps (one trace per leaf shape),
    so the same arithmetic, without a dispatch per leaf."""
    grad_norm = leafwise.global_norm(grads)
    finite, skipped, lr = _finite_and_lr(loss, grad_norm, opt_state[1][0].count, cfg)
    params, opt_state = leafwise.update_traced(_optimiser_leaf_step, grads, opt_state, params, grad_norm, finite,
                                               static=cfg)
    return params, opt_state, dict(grad_norm=grad_norm, skipped=skipped, lr=lr)


_fused_when_ready = leafwise.Prebuilt(_apply_gradients_fused, static_argnums=(4,))


def train_step(graphdef, params, opt_state, batch: UpdateBatch, cfg: UpdateConfig, num_micro: int,
               use_current_as_old: bool = False, layout=None, totals=None):
    """One optimiser step on a mini-batch split into `num_micro` micro-batches (of whole groups
    sharing their prompts' forward with a `layout`); `params` and `opt_state` are donated.

    `use_current_as_old` takes π_old = stop_gradient(π_θ) (ρ = 1 exactly): valid for the first
    mini-batch of the first epoch, whose params are still the sampling policy's.

    Two programs, not one: compiled together, XLA's CPU scheduler overlapped a single
    micro-batch's backward pass with the optimiser and needed 3.6 GB of temporaries for SmolLM2
    at 4 × 384 tokens, against 0.7 GB for the gradients alone.
    """
    loss, grads, metrics = _gradient_program(graphdef, params)(graphdef, params, batch, cfg, num_micro,
                                                               use_current_as_old, layout, totals)
    params, opt_state, step_metrics = _apply_gradients(params, opt_state, grads, loss, cfg)
    return params, opt_state, {**metrics, **step_metrics}


@jax.jit
def summarise_steps(per_step: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """One RL step's update metrics from all its optimiser steps (device arrays in and out, nothing
    fetched): `skipped` is the number of steps skipped (a NaN step anywhere in the update shows);
    every other metric is its mean over the steps that were applied, and `grad_norm_max` the
    largest pre-clip gradient norm among them (one spike is not averaged away). A skipped step
    changed nothing and its loss or norm is not finite, so it would only turn the means into NaN;
    with every step skipped they are NaN."""
    stacked = {k: jnp.stack([jnp.asarray(m[k], jnp.float32) for m in per_step]) for k in per_step[0]}
    applied = stacked["skipped"] == 0
    count = jnp.sum(applied)
    out = {k: jnp.sum(jnp.where(applied, v, 0.0)) / count for k, v in stacked.items()}  # 0 / 0: NaN
    out["skipped"] = jnp.sum(stacked["skipped"])
    largest = jnp.max(jnp.where(applied, stacked["grad_norm"], -jnp.inf))
    out["grad_norm_max"] = jnp.where(count > 0, largest, jnp.nan)
    return out


@jax.jit
def _rows_of(batch: UpdateBatch, rows: jax.Array) -> UpdateBatch:
    """The batch's `rows`, as one program (eager indexing is a few small programs per field)."""
    return jax.tree.map(lambda x: x[rows], batch)


class Updater:
    """Holds the optimiser state and applies `update` to an NNX model in place."""

    def __init__(self, model, cfg: UpdateConfig):
        self.cfg = cfg
        self.graphdef, params = nnx.split(model)
        self.opt_state = make_optimizer(cfg).init(params)
        self.model = model

    def update(self, batch: UpdateBatch, rng: np.random.Generator | None = None,
               on_step: Callable[[], None] | None = None, layout=None,
               facts: row_selection.RowFacts | None = None) -> list[dict[str, Any]]:
        """`ppo_epochs` passes over the batch in mini-batches (shuffled each epoch when `rng` is
        given: whole groups with a shared-prefix `layout`); returns one metrics dict per optimiser
        step (device arrays: fetch them late; `rows_computed_frac`: the share of the mini-batch's
        rows its forward and backward computed).
        `facts` (row_selection.RowFacts): identical rows computed once, with their multiplicity as
        weight, and rows without a gradient not at all — the same loss and gradients; None: every
        row computed. `on_step()`, when given, is called as each optimiser step finishes on the
        device (for a progress bar: it waits for each step, which costs only the next step's
        dispatch latency)."""
        cfg = self.cfg
        n = batch.tokens_NL.shape[0]
        mini = cfg.ppo_mini_batch_size or n
        micro = cfg.micro_batch_size or mini
        if n % mini or mini % micro:
            raise ValueError(f"batch of {n} rows does not split into mini-batches of {mini} "
                             f"and micro-batches of {micro}")
        if batch.old_logp_NL is None and optimiser_steps(cfg, n) > 1:
            raise ValueError(f"old_logp_NL is None, but the update takes {optimiser_steps(cfg, n)} optimiser "
                             f"steps: only the first one has π_old = π_θ")
        g = 1 if layout is None else layout.group_size
        if layout is not None and (micro % g or batch.prefix_len_N is None):
            raise ValueError(f"a shared-prefix update needs prefix_len_N and micro-batches of whole groups "
                             f"({micro} rows, groups of {g})")
        facts = facts or row_selection.RowFacts.every_row(n)
        packed = bool(cfg.max_tokens_per_micro_batch)  # packed micro-batches: a prefix layout is not used
        _, params = nnx.split(self.model)
        metrics = []
        for epoch in range(cfg.ppo_epochs):
            groups = rng.permutation(n // g) if rng is not None else np.arange(n // g)
            order = (groups[:, None] * g + np.arange(g)[None, :]).reshape(-1)
            for k, start in enumerate(range(0, n, mini)):
                sel = row_selection.select(facts, order[start:start + mini], mini // micro,
                                           0 if layout is None or packed else g)
                mini_batch = dataclasses.replace(_rows_of(batch, jax.device_put(sel.rows_U)),
                                                 weight_N=jax.device_put(sel.weight_U))
                totals = None if sel.num_tokens is None else (np.float32(sel.num_tokens), np.float32(sel.num_seqs))
                if packed:
                    params, self.opt_state, m = packed_train_step(
                        self.graphdef, params, self.opt_state, mini_batch, cfg, epoch == 0 and k == 0, totals=totals)
                else:
                    params, self.opt_state, m = train_step(
                        self.graphdef, params, self.opt_state, mini_batch, cfg, mini // micro,
                        epoch == 0 and k == 0, _with_group_size(layout, sel), totals)
                m["rows_computed_frac"] = np.float32(sel.computed / mini)
                metrics.append(m)
                if on_step is not None:
                    jax.block_until_ready(m)
                    on_step()
        nnx.update(self.model, params)
        return metrics
