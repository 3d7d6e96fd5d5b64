"""Jitted prefill + decode over a KV cache, with per-row stops and append-and-continue.

Legend: B rows, K decode steps per device call, V vocab, W append width.

The host drives a `Sampler` in rounds. Each `decode` call runs a jitted `while_loop` of at most
`steps_per_call` steps and comes back early as soon as any row *stops*: it sampled a stop id,
reached its token budget, or sampled a token that could complete a stop string. Coming back at
those events lets the multi-turn rollout fire a row's search while the other rows keep decoding
in the next call. Stop strings (`</tool_call>`, `</search>`, `</answer>`) are checked on the
host against the decoded text, but only at tokens whose text contains a stop string's last
character (a precomputed [V] table), so a row never decodes past a stop string and nothing has
to be rolled back.

A row's last sampled token is not yet in the cache ("pending"); it is fed first when the row
continues, followed by any appended tokens (a tool result). Appending writes only the new tokens
(the history stays in the cache), ragged rows leaving invalid holes in the shared slot cursor.

Each call works on the first `span` slots of the cache only (a copy in, a copy back out, once
per call): the next power of two that holds every slot it can write, at least `min_span`.
A cache sized for the longest episode is mostly empty for most of a rollout, and reading all of
it at every step would cost as much as the weights once it is a few times longer than the text.

Done rows: each call gathers the rows that are decoding into the smallest power-of-two batch
bucket that holds them, decodes that sub-batch, and scatters its cache rows back. So rows that
are finished or waiting for a search cost nothing per step; the price is one gather/scatter of
the active rows' cache (their first `span` slots) per call, paid only when the bucket is smaller
than the full batch. Appends feeding at most 1/`append_gather_divisor` (8) of the batch do the same: the searches of a batch
return apart, so most appends feed a few rows, and extending the whole batch for them cost a
96-row validation 16 s per 131 tokens (world_igpo's validation, 2026-12-06: 245 s warm before).
The decode gather pays off over a call of several steps, not over one: in a wide batch whose
rows stop at different steps nearly every call comes back after one step (world_igpo's 96-row
greedy validation, 2026-12-07, under load: one step of 64 gathered rows 1.97 s, of the whole batch
with those 64 rows active 0.49 s), so `gather_decoding_rows=False` decodes the whole batch, the
other rows masked (rollouts with lockstep turns, episodes.py).

Refilling (continuous batching): `restart` gives a row whose sequence is over a new prompt while
the others keep their caches; the row's old slots become holes. With `compact_cache=True` the
cursor does not just run on into those holes: when the cache runs short, one gather moves each
row's valid slots to the front (order kept, so causality and RoPE positions are unchanged) and the
cursor drops to the longest row. The cache then has to hold the longest live sequence, not the sum
of all sequences a row has held (episodes.py bounds its memory this way).

Shared prompt prefill (`share_prompt_prefill=True`): rows that start from the same tokens (the G
rollouts of a question) are prefilled once. The distinct prompts run as a small batch over a
fresh cache window of the same span, and their keys/values are copied into every row that starts
from them, so each row holds what its own prefill would have written. Per-row seeds are untouched.
When the rows' prompts differ but open with the same tokens (one system prompt, many questions: a
validation batch of distinct questions), those tokens are prefilled once for all the rows and
each row's remainder is extended above them (a prefix's keys and values depend on its own tokens
only), whenever that computes fewer token slots than prefilling the whole prompts.

Sampling is reproducible per row: the k-th token of row r's s-th segment (turn) uses
fold_in(fold_in(key_r, s), k), so it does not depend on which other rows share the batch, and
later turns do not reuse the first turn's random draws.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from igpo_jax.rollout.buckets import power_of_two, quarter_octave, quarter_octave_floor
from igpo_jax.model.kv_cache import KVCache, extend

FINISH_STOP = "stop"  # a stop token id or a stop string
FINISH_LENGTH = "length"  # the row's max_new_tokens
FINISH_CONTEXT = "context"  # the KV cache (context limit) is full


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling params {self}: need temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample_tokens(logits_BV, keys_B, params: SamplingParams):
    """One token per row from fp32 logits: temperature, then top-k, then top-p (nucleus)."""
    if params.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / params.temperature
    if params.top_k:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < top_p_threshold(probs, params.top_p)[:, None], -jnp.inf, logits)
    return categorical_inverse_cdf(logits, keys_B)


def top_p_threshold(probs_BV, top_p: float):
    """Per row, the largest probability t with Σ{p ≥ t} ≥ top_p: keeping p ≥ t is the smallest
    nucleus whose mass reaches top_p (ties at t all stay), the same set as sorting would give.

    Found by bisection on the float32 bit patterns, which order non-negative floats like the
    floats themselves: 31 masked sums over the vocab, exact, and far cheaper on a CPU than
    sorting [B, V] every decode step."""
    bits_BV = jax.lax.bitcast_convert_type(probs_BV.astype(jnp.float32), jnp.int32)
    b = probs_BV.shape[0]

    def halve(_, bounds):
        lo_B, hi_B = bounds  # invariant: mass(lo) ≥ top_p > mass(hi)
        mid_B = lo_B + (hi_B - lo_B) // 2
        mass_B = jnp.sum(jnp.where(bits_BV >= mid_B[:, None], probs_BV, 0.0), axis=-1)
        reaches = mass_B >= top_p
        return jnp.where(reaches, mid_B, lo_B), jnp.where(reaches, hi_B, mid_B)

    lo_B = jnp.zeros((b,), jnp.int32)
    hi_B = jnp.max(bits_BV, axis=-1) + 1
    lo_B, _ = jax.lax.fori_loop(0, 31, halve, (lo_B, hi_B))
    return jax.lax.bitcast_convert_type(lo_B, jnp.float32)


_CDF_BLOCK = 256  # vocab entries per block of the two-level cumulative sum


def categorical_inverse_cdf(logits_BV, keys_B):
    """One draw per row from softmax(logits_BV) by inverting its CDF at one uniform number per row.

    `jax.random.categorical` (Gumbel-max) draws V random numbers per row per token: on a CPU, the
    threefry rounds over [B, 49152] cost more than the vocab projection itself. This needs one.
    The CDF is two-level (sums of blocks of 256, then one block's entries) so the cumulative sums
    stay short and exact enough. Tokens with probability 0 (masked by top-k/top-p) are never drawn.
    """
    b, v = logits_BV.shape
    probs = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    pad = (-v) % _CDF_BLOCK
    blocks_BNC = jnp.pad(probs, ((0, 0), (0, pad))).reshape(b, -1, _CDF_BLOCK)
    cum_BN = jnp.cumsum(jnp.sum(blocks_BNC, axis=-1), axis=-1)
    target_B = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys_B) * cum_BN[:, -1]
    # the block whose cumulative mass first exceeds the target (empty blocks never qualify)
    block_B = jnp.minimum(jnp.sum(cum_BN <= target_B[:, None], axis=-1), cum_BN.shape[1] - 1)
    before_B = jnp.where(block_B > 0, jnp.take_along_axis(cum_BN, (block_B - 1)[:, None], 1)[:, 0], 0.0)
    within_BC = jnp.take_along_axis(blocks_BNC, block_B[:, None, None], 1)[:, 0]
    cum_BC = before_B[:, None] + jnp.cumsum(within_BC, axis=-1)
    # rounding may put the target past the block's last entry: fall back to its last non-zero one
    last_nonzero_B = jnp.max(jnp.where(within_BC > 0, jnp.arange(_CDF_BLOCK), 0), axis=-1)
    index_B = jnp.minimum(jnp.sum(cum_BC <= target_B[:, None], axis=-1), last_nonzero_B)
    return (block_B * _CDF_BLOCK + index_B).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeRows:
    """Per-row decode state on the device (a sub-batch of the cache's rows)."""

    input_B: jax.Array  # token fed at the next step (the pending token)
    active_B: jax.Array  # bool
    count_B: jax.Array  # tokens sampled in this row's current segment
    budget_B: jax.Array  # max tokens in the current segment
    key_B: jax.Array  # per-row PRNG keys


def decode_loop(graphdef, state, cache: KVCache, rows: DecodeRows, stop_ids, may_end_stop_V, params, steps: int):
    """Up to min(`steps`, room) decode steps; returns early when any active row stops or hits a
    candidate. `steps` fixes the output shape (static); room = size − length (traced) is the
    cache space left, so a nearly full cache does not compile a new loop for every remaining
    length."""
    model = nnx.merge(graphdef, state)
    b = rows.input_B.shape[0]
    tokens = jnp.zeros((b, steps), jnp.int32)
    logps = jnp.zeros((b, steps), jnp.float32)
    room = cache.size - cache.length

    def cond(carry):
        step, _, rows, _, _, event = carry
        return (step < jnp.minimum(steps, room)) & ~event & jnp.any(rows.active_B)

    def body(carry):
        step, cache, rows, tokens, logps, _ = carry
        hidden, cache = extend(model, cache, rows.input_B[:, None], rows.active_B[:, None])
        logits = model.logits_from_hidden(hidden)[:, 0]
        keys = jax.vmap(jax.random.fold_in)(rows.key_B, rows.count_B)
        tok = sample_tokens(logits, keys, params)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], -1)[:, 0]
        active = rows.active_B
        tokens = tokens.at[:, step].set(jnp.where(active, tok, 0))
        logps = logps.at[:, step].set(jnp.where(active, logp, 0.0))
        count = rows.count_B + active
        stopped = active & (jnp.isin(tok, stop_ids) | (count >= rows.budget_B))
        event = jnp.any(stopped | (active & may_end_stop_V[tok]))
        rows = dataclasses.replace(rows, input_B=jnp.where(active, tok, rows.input_B),
                                   active_B=active & ~stopped, count_B=count)
        return step + 1, cache, rows, tokens, logps, event

    init = (jnp.zeros((), jnp.int32), cache, rows, tokens, logps, jnp.zeros((), bool))
    n_steps, cache, rows, tokens, logps, _ = jax.lax.while_loop(cond, body, init)
    return cache, rows, tokens, logps, n_steps


def _real_rows(cache: KVCache, idx):
    """(idx with its out-of-range padding pointed at a real row, the number of real rows first)."""
    return jnp.minimum(idx, cache.valid_BS.shape[0] - 1), jnp.sum(idx < cache.valid_BS.shape[0])


def _gather_rows(cache: KVCache, idx, span: int):
    """Rows `idx`, slots [0, span) only: a cache of `span` slots (no written slot lies beyond)."""
    rows_of = lambda layers: tuple(x[idx, :, :span] for x in layers)
    return cache.replace(k_layers=rows_of(cache.k_layers), v_layers=rows_of(cache.v_layers),
                         valid_BS=cache.valid_BS[idx, :span], next_pos_B=cache.next_pos_B[idx])


def _scatter_rows(cache: KVCache, idx, sub: KVCache, n_real):
    """Write the first `n_real` rows of `sub` back at `idx`; the cursor advances for everyone."""
    keep = jnp.arange(idx.shape[0]) < n_real
    idx = jnp.where(keep, idx, cache.valid_BS.shape[0])  # out of range → dropped
    span = sub.size
    put = lambda layers, sub_layers: tuple(x.at[idx, :, :span].set(y, mode="drop")
                                           for x, y in zip(layers, sub_layers))
    return cache.replace(
        k_layers=put(cache.k_layers, sub.k_layers), v_layers=put(cache.v_layers, sub.v_layers),
        valid_BS=cache.valid_BS.at[idx, :span].set(sub.valid_BS, mode="drop"),
        next_pos_B=cache.next_pos_B.at[idx].set(sub.next_pos_B, mode="drop"),
        length=sub.length)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9), donate_argnums=(2,))
def _decode_call(graphdef, state, cache, idx, rows, stop_ids_and_table, params, steps, compact, span):
    stop_ids, may_end = stop_ids_and_table
    if not compact:
        sub, rows, tokens, logps, n_steps = decode_loop(graphdef, state, cache.window(span), rows, stop_ids,
                                                        may_end, params, steps)
        return cache.put_window(sub), rows, tokens, logps, n_steps
    safe_idx, n_real = _real_rows(cache, idx)
    sub, rows, tokens, logps, n_steps = decode_loop(
        graphdef, state, _gather_rows(cache, safe_idx, span), rows, stop_ids, may_end, params, steps)
    return _scatter_rows(cache, safe_idx, sub, n_real), rows, tokens, logps, n_steps


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
def _extend_call(graphdef, state, cache, tokens_BW, valid_BW, span):
    model = nnx.merge(graphdef, state)
    _, window = extend(model, cache.window(span), tokens_BW, valid_BW)
    return cache.put_window(window)


# an append gathers its rows into a sub-batch when their power-of-two bucket is ≤ batch / this
# (the default; `Sampler(append_gather_divisor=...)`): 2 makes a wide validation batch's appends
# 3× faster (world_igpo: 226 -> 76 s) but the gathered rows' cache copy costs memory (the demo's
# peak RSS 5.99 -> 6.6-6.9 GiB), so memory-bound configs keep 8
APPEND_GATHER_DIVISOR = 8


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _extend_rows_call(graphdef, state, cache, idx, tokens_UW, valid_UW, span):
    """`_extend_call` for rows `idx` only (real rows first, then out-of-range padding): a tool
    result that returns while most rows still search or decode costs its own rows' tokens, not
    the whole batch's (a 96-row validation extend of 131 tokens took 16 s). A row's keys and
    values depend on its own cache and tokens only; the other rows' new slots stay holes."""
    model = nnx.merge(graphdef, state)
    safe_idx, n_real = _real_rows(cache, idx)
    _, sub = extend(model, _gather_rows(cache, safe_idx, span), tokens_UW, valid_UW)
    return _scatter_rows(cache, safe_idx, sub, n_real)


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def _shared_prefill_call(graphdef, state, cache, tokens_UW, valid_UW, src_B, span, w):
    """Prefill U prompts over a fresh `span`-slot cache, then copy their first `w` slots (all
    their tokens) from prompt src_B[b] into row b at slots [length, length + w) (rows with
    src_B < 0 get holes there, as in a ragged extend). The rows fed must hold nothing yet
    (started or released): a prompt's keys and values depend on its own tokens and positions only."""
    model = nnx.merge(graphdef, state)
    u = tokens_UW.shape[0]
    fresh = KVCache.init(model.cfg, u, span, cache.k_layers[0].dtype)
    _, fresh = extend(model, fresh, tokens_UW, valid_UW)
    fed_B = src_B >= 0
    src_B = jnp.maximum(src_B, 0)
    zero = jnp.zeros((), jnp.int32)
    at = (zero, zero, cache.length, zero)
    copy = lambda layers, new: tuple(jax.lax.dynamic_update_slice(x, y[src_B, :, :w], at) for x, y in zip(layers, new))
    valid_BW = fed_B[:, None] & fresh.valid_BS[src_B, :w]
    return cache.replace(
        k_layers=copy(cache.k_layers, fresh.k_layers), v_layers=copy(cache.v_layers, fresh.v_layers),
        valid_BS=jax.lax.dynamic_update_slice(cache.valid_BS, valid_BW, (zero, cache.length)),
        next_pos_B=jnp.where(fed_B, fresh.next_pos_B[src_B], cache.next_pos_B), length=cache.length + w)


@functools.partial(jax.jit, donate_argnums=(0,))
def _release_call(cache, rows_B):
    """Rows `rows_B` (bool) hold nothing any more: their slots become holes, positions restart at 0."""
    return cache.replace(valid_BS=cache.valid_BS & ~rows_B[:, None],
                         next_pos_B=jnp.where(rows_B, 0, cache.next_pos_B))


@functools.partial(jax.jit, donate_argnums=(0,))
def _compact_call(cache):
    """Each row's valid slots moved to the front, in order; the cursor drops to the longest row."""
    order_BS = jnp.argsort(~cache.valid_BS, axis=1, stable=True)
    moved = lambda layers: tuple(jnp.take_along_axis(x, order_BS[:, None, :, None], axis=2) for x in layers)
    valid_BS = jnp.take_along_axis(cache.valid_BS, order_BS, axis=1)
    return cache.replace(k_layers=moved(cache.k_layers), v_layers=moved(cache.v_layers), valid_BS=valid_BS,
                         length=jnp.max(jnp.sum(valid_BS, axis=1, dtype=jnp.int32)))


@jax.jit
def _used_slots(valid_BS):
    return jnp.max(jnp.sum(valid_BS, axis=1, dtype=jnp.int32))


@jax.jit
def _slots_per_row(valid_BS):
    return jnp.sum(valid_BS, axis=1, dtype=jnp.int32)


@dataclasses.dataclass
class RowOutput:
    """What one row generated since its last start/append."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None = None  # None while the row can still decode


@dataclasses.dataclass
class _HostRow:
    base_key: np.ndarray
    key: np.ndarray  # this segment's key: fold_in(base_key, segment)
    pending: list[int]  # sampled/appended tokens not yet in the cache
    budget: int = 0
    out: RowOutput = dataclasses.field(default_factory=lambda: RowOutput([], []))
    decoding: bool = False
    segment: int = 0


def stop_string_table(tokenizer, stop_strings: Sequence[str], vocab_size: int) -> np.ndarray:
    """[V] bool: the token's text contains the last character of some stop string."""
    table = np.zeros((vocab_size,), bool)
    last_chars = {s[-1] for s in stop_strings if s}
    if not last_chars:
        return table
    for tok_id in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([tok_id])
        table[tok_id] = any(c in text for c in last_chars)
    return table


class Sampler:
    """Batched, resumable generation for `batch_size` rows over one KV cache of `cache_size` slots.

        s = Sampler(model, tokenizer, batch_size=16, cache_size=4096, stop_strings=("</search>",))
        s.start(prompts_token_ids, seeds, max_new_tokens=512)
        while s.decoding_rows():
            for row, out in s.decode().items(): ...   # rows that stopped in this call
            s.append(row, tool_result_ids, max_new_tokens=512)   # continue a stopped row
            s.restart([row], [next_prompt_ids], [seed], 512)       # or: a new sequence in that row
    """

    def __init__(self, model, tokenizer, batch_size: int, cache_size: int,
                 params: SamplingParams = SamplingParams(), stop_token_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), steps_per_call: int = 32, append_bucket: int = 16,
                 cache_dtype=None, mesh=None, rules=None, min_span: int = 1024,
                 share_prompt_prefill: bool = True, compact_cache: bool = False,
                 append_gather_divisor: int = APPEND_GATHER_DIVISOR, gather_decoding_rows: bool = True):
        if append_gather_divisor < 1:
            raise ValueError(f"append_gather_divisor must be ≥ 1 (1: every append gathers its rows), "
                             f"got {append_gather_divisor}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.params = params
        self.steps_per_call = steps_per_call
        self.append_bucket = append_bucket
        self.min_span = min_span
        self.share_prompt_prefill = share_prompt_prefill  # prefill each distinct prompt once
        self.compact_cache = compact_cache  # squeeze out holes when the cache runs short
        self.append_gather_divisor = append_gather_divisor
        # False: decode the whole batch, rows that are not decoding masked, never a gathered sub-batch
        # (see the module doc: for calls of one or two steps the gather costs more than it saves)
        self.gather_decoding_rows = gather_decoding_rows
        self.stop_strings = tuple(stop_strings)
        self._graphdef, self._state = nnx.split(model)
        vocab = model.cfg.vocab_size
        table = (stop_string_table(tokenizer, self.stop_strings, vocab) if self.stop_strings
                 else np.zeros((vocab,), bool))
        self._stop_id_set = frozenset(int(t) for t in stop_token_ids)
        ids = np.asarray(sorted(self._stop_id_set) or [-1], np.int32)
        self._stop = (_on_device(ids), _on_device(table))
        self._may_end_V = table  # host copy, read after every call
        self._cache_dtype = cache_dtype
        self._mesh, self._rules = mesh, rules  # the cache is created sharded over `mesh` when given
        self.cache: KVCache | None = None
        self.rows: list[_HostRow] = []
        self._early: dict[int, RowOutput] = {}  # rows finished outside a decode call, reported by the next
        # rows whose continuation fits their own context but not yet the shared cursor's room:
        # fed as soon as other rows end or stop ('restart' or None: how to feed them)
        self._blocked: dict[int, str | None] = {}
        self._full: set[int] = set()  # stopped rows with no slot left of their own: an append ends them

    # ------------------------------------------------------------------------------ host API

    def start(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], max_new_tokens: int | Sequence[int]):
        """Fresh cache; prefill every prompt (all but its last token, which is fed at step one)."""
        if len(prompts) > self.batch_size:
            raise ValueError(f"{len(prompts)} prompts for a sampler of batch_size={self.batch_size}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self._graphdef, self._state = nnx.split(self.model)  # the policy may have been updated since
        self.cache = None  # the last rollout's cache goes before the new one is allocated, not after
        self.cache = KVCache.init(self.model.cfg, self.batch_size, self.cache_size, self._cache_dtype,
                                  self._mesh, self._rules)
        budgets = _per_row(max_new_tokens, len(prompts))
        self.rows = [_fresh_row(p, s, n) for p, s, n in zip(prompts, seeds, budgets)]
        self._early, self._blocked, self._full = {}, {}, set()
        self._feed_pending(list(range(len(prompts))), fresh="start")

    def free_cache(self):
        """Hands the KV cache back (between rollouts: the update and validation need the memory;
        the demo's 16-row × 1024-slot cache is 0.75 GB). The next `start` allocates a fresh one."""
        self.cache = None
        self.rows, self._early, self._blocked, self._full = [], {}, {}, set()

    def restart(self, row_ids: Sequence[int], prompts: Sequence[Sequence[int]], seeds: Sequence[int],
                max_new_tokens: int | Sequence[int]):
        """Begin new sequences in stopped rows (continuous batching): their old cache entries are
        dropped, every other row keeps its cache. Sampling in a restarted row is exactly as if
        `start` had been called with its prompt and seed."""
        row_ids = list(row_ids)
        if len(prompts) != len(row_ids) or len(seeds) != len(row_ids):
            raise ValueError(f"{len(row_ids)} rows, {len(prompts)} prompts and {len(seeds)} seeds")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.release(row_ids)
        for r, p, seed, n in zip(row_ids, prompts, seeds, _per_row(max_new_tokens, len(row_ids))):
            self.rows[r] = _fresh_row(p, seed, n)
        self._feed_pending(row_ids, fresh="restart")

    def release(self, row_ids: Sequence[int]):
        """Stopped rows whose sequences are over: their slots become holes (reclaimed by
        compaction) and a report still pending for them is dropped."""
        for r in row_ids:
            if not 0 <= r < len(self.rows):
                raise ValueError(f"row {r} was never started (started rows: {len(self.rows)})")
            if self.rows[r].decoding:
                raise ValueError(f"row {r} is still decoding; release only stopped rows")
            self._early.pop(r, None)
            self._full.discard(r)
        mask = np.zeros((self.batch_size,), bool)
        mask[list(row_ids)] = True
        self.cache = _release_call(self.cache, _on_device(mask))

    def append(self, row_ids: int | Sequence[int], tokens: Sequence[int] | Sequence[Sequence[int]],
               max_new_tokens: int | Sequence[int]):
        """Continue stopped rows after appending `tokens` (e.g. a rendered tool result) to each."""
        if isinstance(row_ids, int):
            row_ids, tokens = [row_ids], [tokens]
        budgets = _per_row(max_new_tokens, len(row_ids))
        for r, toks, n in zip(row_ids, tokens, budgets):
            row = self.rows[r]
            if row.decoding:
                raise ValueError(f"row {r} is still decoding; append only to stopped rows")
            row.pending.extend(int(t) for t in toks)
            row.budget, row.out, row.decoding = n, RowOutput([], []), True
            row.segment += 1
            row.key = np.asarray(jax.random.fold_in(row.base_key, row.segment))
        self._feed_pending(list(row_ids))

    def decoding_rows(self) -> list[int]:
        """Rows that have not stopped: decoding, or waiting for room to feed their continuation."""
        return [i for i, r in enumerate(self.rows) if r.decoding]

    def blocked_rows(self) -> list[int]:
        """Rows whose continuation (an append or a restart's prompt) fits their own context but is
        waiting for the shared cursor to have room: other rows must stop or end first."""
        return sorted(self._blocked)

    def decode(self) -> dict[int, RowOutput]:
        """One device call; returns the rows that stopped in it (tokens since their last start)
        and rows whose start/append did not fit the cache (finish reason 'context')."""
        self._feed_blocked()
        early, self._early = self._early, {}
        active = [r for r in self.decoding_rows() if r not in self._blocked]
        if not active:
            return early
        length = int(self.cache.length)
        if self.cache_size - length < self.steps_per_call:  # compact for a full call, or for any room at all
            length = self._compact_if_it_frees(self.steps_per_call if length < self.cache_size else 1)
        if length >= self.cache_size:
            if not self.compact_cache:  # without compaction the cursor never comes back: all end
                return {**early, **{i: self._finish(i, FINISH_CONTEXT) for i in active}}
            early.update(self._end_rows_at_their_limit())  # the cursor drops to the next longest row
            active = [r for r in self.decoding_rows() if r not in self._blocked]
            if not active:
                return early
            length = int(self.cache.length)
        room = self.cache_size - length
        bucket = power_of_two(len(active))
        compact = self.gather_decoding_rows and bucket < self.batch_size
        n = bucket if compact else self.batch_size
        row_index = active + [self.batch_size] * (bucket - len(active)) if compact else list(range(n))
        active_set = set(active)
        in_call = {r: j for j, r in enumerate(row_index) if r in active_set}

        def per_row(fn, default, dtype):
            return np.asarray([fn(self.rows[r]) if r in in_call else default for r in row_index], dtype)

        rows = DecodeRows(
            input_B=_on_device(per_row(lambda h: h.pending[-1], 0, np.int32)),
            active_B=_on_device(per_row(lambda h: True, False, bool)),
            count_B=_on_device(per_row(lambda h: len(h.out.tokens), 0, np.int32)),
            budget_B=_on_device(per_row(lambda h: h.budget, 0, np.int32)),
            key_B=_on_device(np.stack([self.rows[r].key if r in in_call else self.rows[active[0]].key
                                        for r in row_index])),
        )
        self.cache, rows, tokens, logps, n_steps = _decode_call(
            self._graphdef, self._state, self.cache, _on_device(row_index, np.int32), rows, self._stop,
            self.params, self.steps_per_call, compact, self._span(length + self.steps_per_call))
        tokens, logps = np.asarray(tokens), np.asarray(logps)
        counts, still_active = np.asarray(rows.count_B), np.asarray(rows.active_B)
        may_end = self._may_end_V
        stopped = early
        for r, j in in_call.items():
            host = self.rows[r]
            new = int(counts[j]) - len(host.out.tokens)
            if new == 0:
                continue
            host.out.tokens.extend(int(t) for t in tokens[j, :new])
            host.out.logprobs.extend(float(x) for x in logps[j, :new])
            host.pending = [host.out.tokens[-1]]  # sampled but not yet fed
            last = host.out.tokens[-1]
            if last in self._stop_id_set or (may_end[last] and self._completes_stop_string(host.out.tokens)):
                stopped[r] = self._finish(r, FINISH_STOP)
            elif not still_active[j]:
                stopped[r] = self._finish(r, FINISH_LENGTH)
        if int(self.cache.length) >= self.cache_size and self._compact_if_it_frees(1) >= self.cache_size:
            if self.compact_cache:  # a row ends at its own context limit, not at another row's
                stopped.update(self._end_rows_at_their_limit())
            else:
                for r in self.decoding_rows():
                    stopped[r] = self._finish(r, FINISH_CONTEXT)
        return stopped

    def generate(self, prompts, seeds, max_new_tokens) -> list[RowOutput]:
        """Single-turn convenience: start, then decode until every row has stopped."""
        self.start(prompts, seeds, max_new_tokens)
        outputs = self.decode()
        while self.decoding_rows():
            outputs.update(self.decode())
        return [outputs[i] for i in range(len(prompts))]

    # ------------------------------------------------------------------------------ internals

    def _span(self, slots_needed: int) -> int:
        """The cache slots a call attends over: the next power of two ≥ `slots_needed`, raised to
        `min_span`, capped at the cache. Powers of two bound the compiles to
        log2(cache_size / min_span) + 1 spans."""
        return min(self.cache_size, power_of_two(slots_needed, self.min_span))

    def _compact_if_it_frees(self, slots: int) -> int:
        """With `compact_cache`, compact when that frees at least `slots` slots (a full gather of
        the cache: worth it only when the cursor is near the end). Returns the cursor."""
        length = int(self.cache.length)
        if self.compact_cache and length - int(_used_slots(self.cache.valid_BS)) >= slots:
            self.cache = _compact_call(self.cache)
            length = int(self.cache.length)
        return length

    def _end_rows_at_their_limit(self) -> dict[int, RowOutput]:
        """With the cache compacted and still full, the rows that hold `cache_size` slots of their
        own are at their context limit (IGPO_SPEC §1: an episode is cut at its own limit): a
        decoding one ends with 'context'; a stopped one (waiting for a search) could take no
        continuation, so its next append ends it. Their slots become holes and the cache is
        compacted again, so the cursor drops to the longest row that can still grow."""
        used = np.asarray(_slots_per_row(self.cache.valid_BS))
        full = [r for r in range(len(self.rows)) if used[r] >= self.cache_size]
        ended = {}
        for r in full:
            if self.rows[r].decoding and r not in self._blocked:
                ended[r] = self._finish(r, FINISH_CONTEXT)
            elif not self.rows[r].decoding:
                self._full.add(r)
        if full:
            mask = np.zeros((self.batch_size,), bool)
            mask[full] = True
            self.cache = _compact_call(_release_call(self.cache, _on_device(mask)))
        return ended

    def _feed_blocked(self):
        """Retry the blocked continuations; when no other row is decoding, the one holding the most
        slots (the one that sets the cursor, so its own room is the cache's) is fed alone."""
        if not self._blocked:
            return
        blocked, self._blocked = self._blocked, {}
        for fresh in (None, "restart"):
            rows = [r for r, f in blocked.items() if f == fresh]
            if rows:
                self._feed_pending(rows, fresh)
        if self._blocked and not any(r not in self._blocked for r in self.decoding_rows()):
            self._compact_if_it_frees(1)
            used = np.asarray(_slots_per_row(self.cache.valid_BS))
            r = max(self._blocked, key=lambda r: used[r])
            if used[r] >= int(self.cache.length):  # it sets the cursor: alone it fits, at its own width
                self._feed_pending([r], self._blocked.pop(r), exact=True)

    def _finish(self, r: int, reason: str) -> RowOutput:
        host = self.rows[r]
        host.decoding = False
        host.out.finish_reason = reason
        return host.out

    def _completes_stop_string(self, tokens: list[int]) -> bool:
        """Does the last token complete a stop string? Decode a short tail only."""
        longest = max(len(s) for s in self.stop_strings)
        tail = tokens[-(longest + 1):]
        text = self.tokenizer.decode(tail)
        before = len(self.tokenizer.decode(tail[:-1]))
        return any(text.find(s, max(0, before - len(s) + 1)) != -1 for s in self.stop_strings)

    def _feed_pending(self, row_ids: list[int], fresh: str | None = None, exact: bool = False):
        """Write each row's pending tokens except the last into the cache, in one ragged extend.
        `fresh` ('start' | 'restart'): the rows hold nothing yet, so their prompts can be prefilled
        on their own (`_prefill_apart`): once per distinct prompt with `share_prompt_prefill`, and
        always for a restart (a few rows, while the others keep their caches)."""
        full = [r for r in row_ids if r in self._full]  # no slot of their own left: they end here
        for r in full:
            self._early[r] = self._finish(r, FINISH_CONTEXT)
        row_ids = [r for r in row_ids if r not in self._full]
        longest = max((len(self.rows[r].pending) - 1 for r in row_ids), default=0)
        if longest <= 0:
            return
        # exact: the one row that sets the cursor, fed at its own length (one more compiled width,
        # only when the cache is nearly full) so that a row never ends before its own limit
        width = longest if exact else power_of_two(longest, self.append_bucket)
        feeds = {r: tuple(self.rows[r].pending[:-1]) for r in row_ids}
        if fresh == "start" and self.share_prompt_prefill and self._prefill_common_prefix(feeds, width):
            self._feed_pending(row_ids)  # the rest of each prompt: one ragged extend above the prefix
            return
        prompts = list(dict.fromkeys(feeds.values())) if self.share_prompt_prefill else list(feeds.values())
        apart = (fresh == "restart" or (fresh == "start" and self.share_prompt_prefill)) and \
            power_of_two(len(prompts)) < self.batch_size
        # the fed rows only, as a small batch (as decode does), when they are few: the gathered rows'
        # cache is copied for the call, and at half the batch that copy outweighed the activations
        # it saved (demo: 465 against 189 MiB of temporaries; its peak RSS 5.85 -> 6.55 GiB)
        bucket = power_of_two(len(feeds))
        gather = bucket * self.append_gather_divisor <= self.batch_size
        if fresh is None and not exact and not gather:
            # an append to the whole batch computes every row at the longest feed's width: a quarter
            # octave pads that by ≤ 1/4 where a power of two pads by up to 2× (world_igpo's lockstep
            # validation: 96 rows of 39-88 result tokens, 96 slots a row against 128), for at most
            # four widths an octave, each one row count: a few more compiled programs
            width = quarter_octave(longest, self.append_bucket)
        # apart, the main cache takes only the prompts' slots (rounded to a quarter octave), not the
        # power-of-two width they are computed in: a restart's prompt lands above the longest row
        written = min(width, quarter_octave(longest, self.append_bucket)) if apart else width
        length = int(self.cache.length)
        if length + written > self.cache_size:
            length = self._compact_if_it_frees(length + written - self.cache_size)
        if length + written > self.cache_size:
            if fresh == "start" or not self.compact_cache:  # an empty cache, or one that never compacts
                for r in row_ids:
                    self._early[r] = self._finish(r, FINISH_CONTEXT)
                return
            # a row whose own tokens would pass the limit ends; the others wait for room
            used = np.asarray(_slots_per_row(self.cache.valid_BS))
            for r in row_ids:
                if used[r] + len(self.rows[r].pending) > self.cache_size:
                    self._early[r] = self._finish(r, FINISH_CONTEXT)
                else:
                    self._blocked[r] = fresh
            return
        for r in row_ids:
            self.rows[r].pending = self.rows[r].pending[-1:]
        if apart:
            src = {r: prompts.index(f) for r, f in feeds.items()} if self.share_prompt_prefill else \
                {r: i for i, r in enumerate(feeds)}
            self._prefill_apart(prompts, src, width, written)
            return
        span = self._span(length + width)
        row_index = list(feeds) + [self.batch_size] * (bucket - len(feeds)) if gather else range(self.batch_size)
        tokens = np.zeros((len(row_index), width), np.int32)
        valid = np.zeros((len(row_index), width), bool)
        for j, r in enumerate(row_index):
            feed = feeds.get(r, ())
            tokens[j, :len(feed)] = feed
            valid[j, :len(feed)] = True
        if gather:
            self.cache = _extend_rows_call(self._graphdef, self._state, self.cache, _on_device(row_index, np.int32),
                                           _on_device(tokens), _on_device(valid), span)
        else:
            self.cache = _extend_call(self._graphdef, self._state, self.cache, _on_device(tokens),
                                      _on_device(valid), span)

    def _prefill_common_prefix(self, feeds: dict[int, tuple[int, ...]], width: int) -> bool:
        """Prefill the tokens every fed row starts with (a system prompt) once, copy them into all
        the rows and drop them from their pending tokens, when that computes fewer token slots than
        prefilling the prompts themselves (distinct questions after one long system prompt: a
        validation batch). The prefix is cut at a quarter octave or a multiple of `append_bucket`,
        whichever keeps more of it, so its width takes few shapes: every row's remainder is
        computed at the longest one's (power-of-two) width, and a cut at 224 of world_igpo's 247
        common tokens left 47 of them, a width of 64 for 96 rows, where a cut at 240 leaves 32."""
        common = _common_prefix(list(feeds.values()))
        if common < self.append_bucket:
            return False
        cut = max(quarter_octave_floor(common), common // self.append_bucket * self.append_bucket)
        prefix_width = power_of_two(cut, self.append_bucket)
        rest = max(len(f) for f in feeds.values()) - cut
        distinct = power_of_two(len(set(feeds.values())))
        today = (distinct if distinct < self.batch_size else self.batch_size) * width
        if prefix_width + self.batch_size * power_of_two(rest, self.append_bucket) >= today:
            return False
        if int(self.cache.length) + cut > self.cache_size:
            return False  # the plain path finishes the rows with 'context'
        prefix = next(iter(feeds.values()))[:cut]
        self._prefill_apart([prefix], dict.fromkeys(feeds, 0), prefix_width, cut)
        for r in feeds:
            self.rows[r].pending = self.rows[r].pending[cut:]
        return True

    def _prefill_apart(self, prompts: list[tuple[int, ...]], src: dict[int, int], width: int, written: int):
        """Prefill `prompts` (a power-of-two batch of them) and copy prompt src[r] into row r.
        The prefill attends over `_span(width)` slots, the window a plain prefill into an empty
        cache uses, so the keys and values are those of the plain path up to the batch size (its
        own cache holds `width` slots even where the main cache is smaller)."""
        u = power_of_two(len(prompts))
        tokens = np.zeros((u, width), np.int32)
        valid = np.zeros((u, width), bool)
        for i, feed in enumerate(prompts):
            tokens[i, :len(feed)] = feed
            valid[i, :len(feed)] = True
        src_B = np.full((self.batch_size,), -1, np.int32)
        for r, i in src.items():
            src_B[r] = i
        self.cache = _shared_prefill_call(self._graphdef, self._state, self.cache, _on_device(tokens),
                                          _on_device(valid), _on_device(src_B), max(width, self._span(width)), written)


def _on_device(host, dtype=None) -> jax.Array:
    """A host array on the default device, by a transfer: `jnp.asarray` of a host array runs a
    small program (`stage`), compiled, or read from the persistent cache, once per shape."""
    return jax.device_put(np.asarray(host, dtype))


def _common_prefix(sequences: list[tuple[int, ...]]) -> int:
    """The number of leading tokens all `sequences` share."""
    first, n = sequences[0], min(map(len, sequences))
    for other in sequences[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


def _fresh_row(prompt: Sequence[int], seed: int, budget: int) -> _HostRow:
    key = np.asarray(jax.random.PRNGKey(seed))
    # decoding before the prefill, which may finish a row that does not fit
    return _HostRow(base_key=key, key=np.asarray(jax.random.fold_in(key, 0)), pending=list(prompt), budget=budget,
                    decoding=True)


def _per_row(value, n: int) -> list[int]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n:
        raise ValueError(f"expected {n} per-row values, got {len(values)}")
    return values
