"""Gold-answer log-probs per turn (IGPO_SPEC §2): the mean log-prob of the first gold alias's
tokens, teacher-forced in a pseudo final turn appended to the context before each turn.

Legend: N rollouts, B rollouts in one jitted call, L trajectory tokens, C context tokens kept
(≤ L), T turn slots, P pseudo-turn tokens kept per copy, A answer tokens, S = C + T·P, D hidden.

    pseudo_turn(tokenizer, answer, template) → PseudoTurn(ids_P, answer_mask_P)
    score_one_pass(model, trajectories, pseudo_turns) → TurnScores(mean_logp_NT, valid_NT)
    score_one_pass(…, token_logprobs=True) → the same and token_logp_NL: π_old of the loss tokens
    score_per_turn(model, trajectories, pseudo_turns) → the same, one forward per context (oracle)

mean_logp_NT[i, t] = (1/A) Σ_j log π(a_j | tokens[i, :turn_start[i, t]], pseudo prefix, a_<j), in
fp32, for t < T_i (valid_NT); P_t = exp of it is the rewards module's business.

Design: one forward per rollout over [context ‖ T copies of the pseudo turn] with a block
attention mask, rather than forking a KV cache per turn. The context is attended causally; copy t
sees the context keys before turn_start[t] and its own earlier tokens only, and its RoPE positions
continue from the end of that context, so every copy computes exactly what a separate forward over
context_t + pseudo turn would. Why this and not a forked cache: it is one jitted call through the
decoder's explicit mask (no cache plumbing, no T cache copies or gathers of [layers, B, C] keys),
and it costs a forward over C + T·P tokens, where C stops at the last turn_start (the final turn's
tokens are never a context) and P stops at the last answer token (later tokens cannot influence it
causally): for T = 8 turns of ~250 tokens, T·P ≈ 160 extra tokens against ~150 dropped. The price
is attention over S² instead of C² entries, (1 + T·P/C)² — a few percent at realistic lengths.

The prompt a micro-batch shares (`shared_prompt_length`: every row opens with the same system
prompt, ~230 of world_igpo's ~350 tokens a row, and a group's rows with the same question too) is
computed once for the micro-batch, its keys and values attended to by every row
(model/shared_prefix.py): the same mask over the same keys, so the same scores up to float
summation order, for a forward over about half the tokens.

π_old from the same forward: the context queries attend causally to the context alone (the
copies' keys are masked to an exact 0 in their softmax), so their hidden states are those of a
plain forward over the trajectory, and log π(tokens[j] | tokens[:j]) at the loss tokens is
π_old's log-prob wherever the scoring model is the update's starting policy. With
`token_logprobs=True` the context runs to the last loss token instead of the last turn_start
(the final turn's tokens are then inputs too) and its vocab projection covers the loss tokens
only; the update then needs no separate π_old forward (train.py).

Shapes are bucketed (C to 1/4 octave, T to a power of two, P and A to multiples of 8 and 4,
B to a fixed micro-batch) so a training run compiles a handful of programs, not one per batch;
rollouts are sorted by context length before micro-batching so that short ones share a bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from igpo_jax.rollout.trajectories import Trajectories
from igpo_jax.rollout.buckets import power_of_two, quarter_octave
from igpo_jax.data.examples import ANSWER_SEPARATOR as ANSWER_SPLIT  # the reference's alias separator
from igpo_jax.model import shared_prefix
from igpo_jax.model.attention_mask import causal_mask, copies_spec, positions_from_valid
from igpo_jax.model.token_logprobs import logprobs_from_hidden

# The reference's pseudo final turn, appended right after the context (which already ends with the
# assistant header and the forced '<think>' prefix).
DEFAULT_PSEUDO_TURN_TEMPLATE = ("\nNow there's enough information to answer\n</think>\n<answer>\n{answer}\n"
                                "</answer><|im_end|>")
ANSWER_FIELD = "{answer}"


# ----------------------------------------------------------------------------- pseudo turn

@dataclasses.dataclass(frozen=True)
class PseudoTurn:
    ids: np.ndarray  # int32 [P]: the whole pseudo turn
    answer_mask: np.ndarray  # bool [P]: the A tokens that are averaged
    text: str


def first_alias(ground_truth: str) -> str:
    """The alias scored for information gain (§1): the first of `<|answer_split|>`-joined aliases."""
    return ground_truth.split(ANSWER_SPLIT)[0].strip()


def pseudo_turn(tokenizer, answer: str, template: str = DEFAULT_PSEUDO_TURN_TEMPLATE) -> PseudoTurn:
    """Tokenise `template` with `answer` substituted, marking the answer's tokens.

    The whole text is tokenised once (no special tokens added), so the answer's tokens are the ones
    the model sees in this context — tokenising the answer alone could merge differently (e.g. a
    leading space). Boundary rule: a token is an answer token iff its character span overlaps the
    answer's span by at least one character; a token straddling the boundary (answer text merged
    with template text) therefore counts, since predicting it means predicting answer characters.
    With the default template the answer sits between newlines and no token straddles.
    The pseudo turn is tokenised apart from the context: the context ends with special/marker tokens
    ('<think>') and the template starts with a newline, so the join is a pre-tokeniser boundary.
    """
    if template.count(ANSWER_FIELD) != 1:
        raise ValueError(f"the pseudo-turn template must contain {ANSWER_FIELD!r} exactly once: {template!r}")
    prefix, suffix = template.split(ANSWER_FIELD)
    text = prefix + answer + suffix
    start, end = len(prefix), len(prefix) + len(answer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray([s < end and e > start and e > s for s, e in enc["offset_mapping"]], bool)
    return PseudoTurn(ids=ids, answer_mask=mask, text=text)


def pseudo_turns(tokenizer, ground_truths: Sequence[str], template: str = DEFAULT_PSEUDO_TURN_TEMPLATE
                 ) -> list[PseudoTurn]:
    """One pseudo turn per rollout from its ground truth (first alias); a group's copies share one."""
    cache: dict[str, PseudoTurn] = {}
    out = []
    for gt in ground_truths:
        answer = first_alias(gt)
        if answer not in cache:
            cache[answer] = pseudo_turn(tokenizer, answer, template)
        out.append(cache[answer])
    return out


# ----------------------------------------------------------------------------- shapes

class TurnScores(NamedTuple):
    mean_logp_NT: np.ndarray  # float32; 0 where not valid, NaN where the answer has no tokens
    valid_NT: np.ndarray  # bool: t < T_i
    # float32 [N, L] (token_logprobs=True): log π(tokens[:, j] | tokens[:, :j]) at the loss tokens,
    # 0 elsewhere (the update's alignment: column j scores token j)
    token_logp_NL: np.ndarray | None = None


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _answer_layout(pt: PseudoTurn) -> tuple[np.ndarray, np.ndarray]:
    """Answer token indices in the pseudo turn, and the copy: the pseudo turn up to (excluding) the
    last answer token — only tokens that predict an answer token are needed as inputs."""
    idx = np.flatnonzero(pt.answer_mask).astype(np.int32)
    copy = pt.ids[: idx[-1]] if idx.size else pt.ids[:0]
    return idx, copy


def _valid_turns(traj: Trajectories) -> np.ndarray:
    return np.arange(traj.max_turns)[None, :] < np.asarray(traj.num_turns_N)[:, None]


def _split_model(model):
    return model if isinstance(model, tuple) else nnx.split(model)


# ----------------------------------------------------------------------------- one pass

def block_inputs(ctx_valid_BC, turn_start_BT, turn_valid_BT, copy_valid_BP):
    """positions_BS and mask_BSS of [context ‖ T copies] (S = C + T·P), as described in the module
    docstring. Padded turns (turn_valid False) see no context; their outputs are discarded."""
    return (block_positions(ctx_valid_BC, turn_start_BT, copy_valid_BP.shape[1]),
            block_mask(ctx_valid_BC, turn_start_BT, turn_valid_BT, copy_valid_BP))


def block_positions(ctx_valid_BC, turn_start_BT, p: int):
    """positions_BS of [context ‖ T copies of P tokens]."""
    b = ctx_valid_BC.shape[0]
    t = turn_start_BT.shape[1]
    ctx_valid_BC = ctx_valid_BC.astype(bool)
    # Positions skip padding: a copy continues from the number of real tokens before turn_start.
    cum_BC = jnp.cumsum(ctx_valid_BC.astype(jnp.int32), axis=1)
    n_before_BT = jnp.where(turn_start_BT > 0,
                            jnp.take_along_axis(cum_BC, jnp.maximum(turn_start_BT - 1, 0), axis=1), 0)
    copy_pos_BTP = n_before_BT[:, :, None] + jnp.arange(p)[None, None, :]
    return jnp.concatenate([positions_from_valid(ctx_valid_BC), copy_pos_BTP.reshape(b, t * p)], 1)


def block_mask(ctx_valid_BC, turn_start_BT, turn_valid_BT, copy_valid_BP):
    """The [B, S, S] bool mask of [context ‖ T copies] for the dense attention."""
    b, c = ctx_valid_BC.shape
    t, p = turn_start_BT.shape[1], copy_valid_BP.shape[1]
    ctx_valid_BC = ctx_valid_BC.astype(bool)
    # One elementwise rule over (query q, key k) from [B, S] vectors and iotas, never concatenated
    # [B, S, S] blocks: XLA can then fuse the mask into the attention's select as it does a plain
    # causal mask (the concatenated version ran several times slower here). A query may see key k iff k is
    # real and, for a context key, k < limit[q] (q + 1 for context queries: causal; turn_start of
    # its copy for copy queries, 0 for padded turns), or, for a copy key, k is in q's copy and ≤ q.
    s = c + t * p
    seg_S = jnp.concatenate([jnp.full((c,), -1, jnp.int32), jnp.repeat(jnp.arange(t, dtype=jnp.int32), p)])
    limit_BS = jnp.concatenate([jnp.broadcast_to(jnp.arange(1, c + 1, dtype=jnp.int32), (b, c)),
                                jnp.repeat(jnp.where(turn_valid_BT.astype(bool), turn_start_BT, 0), p, axis=1)], 1)
    key_valid_BS = jnp.concatenate([ctx_valid_BC, jnp.tile(copy_valid_BP.astype(bool), (1, t))], 1)
    q_S1, k_1S = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
    ctx_key = (k_1S < c)[None] & (k_1S[None] < limit_BS[:, :, None])
    copy_key = (seg_S[None, :] == seg_S[:, None]) & (k_1S >= c) & (k_1S <= q_S1)
    return key_valid_BS[:, None, :] & (ctx_key | copy_key[None])


def one_pass_mean_logp(model, ctx_tokens_BC, ctx_valid_BC, turn_start_BT, turn_valid_BT,
                       copy_ids_BP, copy_valid_BP, answer_idx_BA, answer_ids_BA, answer_valid_BA,
                       ctx_needed_BC=None, chunk: int = 128, prefix_len: int = 0):
    """mean_logp_BT (fp32) of the answer for every turn slot, from one forward (pure, jit-able);
    with `ctx_needed_BC` (bool), (mean_logp_BT, ctx_logp_BC): also log π(ctx[j] | ctx[:j]) at the
    needed context columns (0 elsewhere and at column 0).

    `prefix_len` (static, dense attention only): the first `prefix_len` context tokens are real
    and the same in row 0 and in every row whose scores are used (`shared_prompt_length`); they
    are computed once, in row 0's forward, and shared (rows that do not share them, padding, read
    garbage).

    answer_idx_BA: where answer token a sits in the pseudo turn; it is predicted by the copy's
    token answer_idx − 1, or by the last context token when the answer opens the pseudo turn.
    """
    b, c = ctx_tokens_BC.shape
    t, p = turn_start_BT.shape[1], copy_ids_BP.shape[1]
    positions_BS = block_positions(ctx_valid_BC, turn_start_BT, p)
    if prefix_len and model.cfg.attention != "dense":
        raise ValueError(f"a shared prompt (prefix_len={prefix_len}) needs model.attention='dense', "
                         f"not {model.cfg.attention!r}")
    if model.cfg.attention == "blockwise":  # O(S) per row instead of the [B, S, S] bool mask
        mask_BSS = copies_spec(ctx_valid_BC, turn_start_BT, turn_valid_BT, copy_valid_BP)
    else:
        mask_BSS = block_mask(ctx_valid_BC, turn_start_BT, turn_valid_BT, copy_valid_BP)
    copies_BTP = jnp.broadcast_to(copy_ids_BP[:, None, :], (b, t, p))
    tokens_BS = jnp.concatenate([ctx_tokens_BC, copies_BTP.reshape(b, t * p)], 1)
    if prefix_len:
        hidden_BSD = _hidden_after_shared_prefix(model, tokens_BS, positions_BS, mask_BSS, prefix_len)
    else:
        hidden_BSD, _ = model.hidden(tokens_BS, positions_BS, mask_BSS)
    d = hidden_BSD.shape[-1]

    # Gather only the A predictor states per copy: the vocab projection runs over B·T·A rows, not B·S.
    copy_hidden_BTPD = hidden_BSD[:, c:].reshape(b, t, p, d)
    prev_BA = jnp.clip(answer_idx_BA - 1, 0, p - 1)
    from_copy_BTAD = jnp.take_along_axis(copy_hidden_BTPD, prev_BA[:, None, :, None], axis=2)
    # The last real context token before turn_start (padding inside a row is allowed).
    last_real_BC = jax.lax.cummax(jnp.where(ctx_valid_BC.astype(bool), jnp.arange(c)[None, :], 0), axis=1)
    last_ctx_BT = jnp.take_along_axis(last_real_BC, jnp.clip(turn_start_BT - 1, 0, c - 1), axis=1)
    from_ctx_BTD = jnp.take_along_axis(hidden_BSD, last_ctx_BT[:, :, None], axis=1)
    opens_BA = (answer_idx_BA == 0)[:, None, :, None]
    pred_BTAD = jnp.where(opens_BA, from_ctx_BTD[:, :, None, :], from_copy_BTAD)
    a = answer_idx_BA.shape[1]
    targets_BTA = jnp.broadcast_to(answer_ids_BA[:, None, :], (b, t, a))
    logp = logprobs_from_hidden(model, pred_BTAD.reshape(b, t * a, d), targets_BTA.reshape(b, t * a))[0]
    logp_BTA = logp.reshape(b, t, a).astype(jnp.float32)
    w_BA = answer_valid_BA.astype(jnp.float32)
    mean_BT = jnp.sum(logp_BTA * w_BA[:, None, :], axis=-1) / jnp.sum(w_BA, axis=-1)[:, None]
    if ctx_needed_BC is None:
        return mean_BT
    ctx_logp = logprobs_from_hidden(model, hidden_BSD[:, :c - 1], ctx_tokens_BC[:, 1:], chunk, False,
                                    ctx_needed_BC[:, 1:].astype(bool))[0]
    return mean_BT, jnp.pad(ctx_logp.astype(jnp.float32), ((0, 0), (1, 0)))


def _hidden_after_shared_prefix(model, tokens_BS, positions_BS, mask_BSS, k: int):
    """`model.hidden(tokens_BS, positions_BS, mask_BSS)[0]` with the first k tokens (the same in
    every row that is used) computed once: row 0's prefix through the decoder, then every row's
    other S − k tokens attending to its keys and values and their own under the mask's rows k…S."""
    b, s = tokens_BS.shape
    prefix_1KD, rest_BRD = shared_prefix.prefixes_then_rows(
        model, tokens_BS[:1, :k], positions_BS[:1, :k], mask_BSS[:1, :k, :k],
        tokens_BS[:, k:], positions_BS[:, k:], mask_BSS[:, k:, :], b)
    return jnp.concatenate([jnp.broadcast_to(prefix_1KD, (b, *prefix_1KD.shape[1:])), rest_BRD], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_pass_jit(graphdef, prefix_len, state, *arrays):
    return one_pass_mean_logp(nnx.merge(graphdef, state), *arrays, prefix_len=prefix_len)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _one_pass_with_tokens_jit(graphdef, chunk, prefix_len, state, *arrays):
    return one_pass_mean_logp(nnx.merge(graphdef, state), *arrays, chunk=chunk, prefix_len=prefix_len)


PREFIX_MULTIPLE = 32  # a shared prompt's length rounded down to this: few programs, ≤ 31 tokens unshared


def shared_prompt_length(arrays: dict[str, np.ndarray], rows: int, multiple: int = PREFIX_MULTIPLE) -> int:
    """The leading context columns that the micro-batch's first `rows` rows (its real ones) share —
    the same tokens, all real — rounded down to `multiple` (0 when that leaves nothing). A copy
    whose turn starts inside them still sees only the keys before its turn: the mask says so."""
    tokens, valid = arrays["ctx_tokens"][:rows], arrays["ctx_valid"][:rows]
    same = valid.all(0) & (tokens == tokens[:1]).all(0)
    length = int(np.argmin(same)) if not same.all() else same.size
    return length // multiple * multiple


def _context_needed(traj: Trajectories, token_logprobs: bool) -> np.ndarray:
    """Context tokens each rollout's forward must hold: up to its last turn_start, or with
    `token_logprobs` up to and including its last loss token."""
    valid_NT = _valid_turns(traj)
    ts = np.asarray(traj.turn_start_NT)
    need_N = np.asarray([ts[i][valid_NT[i]].max() for i in range(traj.num_rollouts)])
    if token_logprobs:
        mask_NL = np.asarray(traj.loss_mask_NL).astype(bool)
        last_N = np.where(mask_NL.any(1), mask_NL.shape[1] - np.argmax(mask_NL[:, ::-1], axis=1), 0)
        need_N = np.maximum(need_N, last_N)
    return need_N


def _micro_batch_arrays(traj: Trajectories, pts: Sequence[PseudoTurn], rows: np.ndarray, batch: int,
                        need_N: np.ndarray, token_logprobs: bool = False):
    """Host-side, bucketed inputs of `one_pass_mean_logp` for `rows` (padded to `batch` rows)."""
    ts = np.asarray(traj.turn_start_NT)
    layouts = [_answer_layout(pts[i]) for i in rows]
    c = quarter_octave(int(need_N[rows].max()), 32)
    t = power_of_two(int(np.asarray(traj.num_turns_N)[rows].max()))
    p = _round_up(max(len(cp) for _, cp in layouts), 8)
    a = _round_up(max(len(ix) for ix, _ in layouts), 4)
    out = dict(
        ctx_tokens=np.zeros((batch, c), np.int32), ctx_valid=np.zeros((batch, c), bool),
        turn_start=np.zeros((batch, t), np.int32), turn_valid=np.zeros((batch, t), bool),
        copy_ids=np.zeros((batch, p), np.int32), copy_valid=np.zeros((batch, p), bool),
        answer_idx=np.zeros((batch, a), np.int32), answer_ids=np.zeros((batch, a), np.int32),
        answer_valid=np.zeros((batch, a), bool))
    if token_logprobs:
        out["ctx_needed"] = np.zeros((batch, c), bool)
    for k, i in enumerate(rows):
        n = min(c, traj.tokens_NL.shape[1])
        out["ctx_tokens"][k, :n] = traj.tokens_NL[i, :n]
        out["ctx_valid"][k, :n] = traj.valid_NL[i, :n]
        if token_logprobs:
            out["ctx_needed"][k, :n] = traj.loss_mask_NL[i, :n]
        nt = int(traj.num_turns_N[i])
        out["turn_start"][k, :nt] = ts[i, :nt]
        out["turn_valid"][k, :nt] = True
        idx, copy = layouts[k]
        out["copy_ids"][k, :len(copy)] = copy
        out["copy_valid"][k, :len(copy)] = True
        out["answer_idx"][k, :len(idx)] = idx
        out["answer_ids"][k, :len(idx)] = pts[i].ids[idx]
        out["answer_valid"][k, :len(idx)] = True
    return out


def score_one_pass(model, traj: Trajectories, pts: Sequence[PseudoTurn], batch_size: int = 8,
                   token_logprobs: bool = False, chunk: int = 128,
                   on_batch: Callable[[int], None] | None = None, dedup: bool = True,
                   share_prompt: bool = True) -> TurnScores:
    """mean_logp_NT for every rollout and turn slot t < T_i, one jitted forward per micro-batch;
    with `token_logprobs`, also the loss tokens' log-probs (`TurnScores.token_logp_NL`, π_old
    when `model` is the policy that sampled; `chunk` positions per row per vocab projection).

    `model`: a Decoder or its (graphdef, state). Micro-batches have exactly `batch_size` rows
    (the last one padded with turn-less rows) so their shape is bucketed too. `on_batch(rows)`,
    when given, hears each micro-batch's rollouts once their scores are on the host (progress bars).
    `dedup`: rollouts of a group that are the same conversation (`Trajectories.first_identical_N`)
    are computed once and share its scores, bitwise. `share_prompt`: the prompt a micro-batch's
    rows share is computed once for it (module docstring; dense attention only).
    """
    graphdef, state = _split_model(model)
    n, t_all = traj.num_rollouts, traj.max_turns
    valid_NT = _valid_turns(traj)
    if len(pts) != n:
        raise ValueError(f"{len(pts)} pseudo turns for {n} rollouts")
    need_N = _context_needed(traj, token_logprobs)
    dense = nnx.merge(graphdef, state).cfg.attention == "dense"  # the prefix path takes a dense mask
    first_N = traj.first_identical_N() if dedup else np.arange(n)
    distinct = np.flatnonzero(first_N == np.arange(n))
    copies = np.bincount(first_N, minlength=n)  # rollouts each distinct one stands for
    order = distinct[np.argsort(need_N[distinct], kind="stable")]
    batch = min(batch_size, n)
    out_NT = np.zeros((n, t_all), np.float32)
    logp_NL = np.zeros(traj.tokens_NL.shape, np.float32) if token_logprobs else None
    for lo in range(0, order.size, batch):
        rows = order[lo:lo + batch]
        arrays = _micro_batch_arrays(traj, pts, rows, batch, need_N, token_logprobs)
        shared = shared_prompt_length(arrays, len(rows)) if share_prompt and dense else 0
        if token_logprobs:
            mean_BT, logp_BC = _one_pass_with_tokens_jit(graphdef, chunk, shared, state, *arrays.values())
            c = min(logp_BC.shape[1], logp_NL.shape[1])
            logp_NL[rows, :c] = np.asarray(logp_BC)[:len(rows), :c]
        else:
            mean_BT = _one_pass_jit(graphdef, shared, state, *arrays.values())
        mean_BT = np.asarray(mean_BT)
        if on_batch is not None:
            on_batch(int(copies[rows].sum()))
        k = min(t_all, mean_BT.shape[1])
        out_NT[rows, :k] = mean_BT[:len(rows), :k]
    out_NT = out_NT[first_N]
    if token_logprobs:
        logp_NL = logp_NL[first_N]
        logp_NL = np.where(np.asarray(traj.loss_mask_NL).astype(bool), logp_NL, 0.0).astype(np.float32)
    return TurnScores(np.where(valid_NT, out_NT, 0.0).astype(np.float32), valid_NT, logp_NL)


# ----------------------------------------------------------------------------- per-turn oracle

@functools.partial(jax.jit, static_argnums=0)
def _plain_mean_logp_jit(graphdef, state, tokens_BS, valid_BS, pred_pos_BA, answer_ids_BA, answer_valid_BA):
    """A plain causal forward per row; mean log-prob of the answer tokens at the given positions."""
    m = nnx.merge(graphdef, state)
    hidden_BSD, _ = m.hidden(tokens_BS, positions_from_valid(valid_BS), causal_mask(valid_BS))
    pred_BAD = jnp.take_along_axis(hidden_BSD, pred_pos_BA[:, :, None], axis=1)
    logp_BA = logprobs_from_hidden(m, pred_BAD, answer_ids_BA)[0].astype(jnp.float32)
    w_BA = answer_valid_BA.astype(jnp.float32)
    return jnp.sum(logp_BA * w_BA, axis=-1) / jnp.sum(w_BA, axis=-1)


def score_per_turn(model, traj: Trajectories, pts: Sequence[PseudoTurn], bucket: bool = True) -> TurnScores:
    """The reference's method and our test oracle: for each turn slot t, one batched forward over
    every rollout's real context tokens[i, :turn_start[i, t]] followed by its full pseudo turn
    (cost ∝ Σ_t len_t). Rows are compacted (padding dropped) and right-padded to a bucketed length."""
    graphdef, state = _split_model(model)
    n, t_all = traj.num_rollouts, traj.max_turns
    valid_NT = _valid_turns(traj)
    out_NT = np.zeros((n, t_all), np.float32)
    a = _round_up(max(int(pt.answer_mask.sum()) for pt in pts), 4)
    for t in range(t_all):
        rows = np.flatnonzero(valid_NT[:, t])
        if rows.size == 0:
            continue
        seqs, answer_pos = [], []
        for i in rows:
            end = int(traj.turn_start_NT[i, t])
            ctx = traj.tokens_NL[i, :end][traj.valid_NL[i, :end].astype(bool)]
            seqs.append(np.concatenate([ctx, pts[i].ids]).astype(np.int32))
            answer_pos.append(len(ctx) + np.flatnonzero(pts[i].answer_mask))
        s = max(map(len, seqs))
        s = quarter_octave(s, 32) if bucket else s
        tokens = np.zeros((len(rows), s), np.int32)
        valid = np.zeros((len(rows), s), bool)
        pred_pos = np.zeros((len(rows), a), np.int32)
        answer_ids = np.zeros((len(rows), a), np.int32)
        answer_valid = np.zeros((len(rows), a), bool)
        for k, (seq, pos) in enumerate(zip(seqs, answer_pos)):
            tokens[k, :len(seq)], valid[k, :len(seq)] = seq, True
            pred_pos[k, :len(pos)] = pos - 1
            answer_ids[k, :len(pos)] = seq[pos]
            answer_valid[k, :len(pos)] = True
        out_NT[rows, t] = np.asarray(_plain_mean_logp_jit(graphdef, state, tokens, valid, pred_pos,
                                                          answer_ids, answer_valid))
    return TurnScores(np.where(valid_NT, out_NT, 0.0).astype(np.float32), valid_NT)
