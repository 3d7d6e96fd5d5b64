"""Information-gain scoring of T-turn trajectories on SmolLM2-135M: one pass (block mask over T
appended answer copies) vs the reference's per-turn forwards vs one plain forward of the trajectory.

    python bench/scoring.py [--batch 4] [--turns 2,4,8] [--repeats 1]

Synthetic rows of realistic shape: prompt 200 tokens, then per turn 100 generated tokens and (for
non-final turns) 150 tool-result tokens. Everything runs jitted, fp32, after a warm-up, in one
process. `forward` is the decoder over the full row (hidden states, no vocab projection: the
stricter denominator); `forward_logprobs` adds the chunked log-probs of every token, as the update
computes. The last line is one JSON object keyed by T.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import timed
from igpo_jax.rollout.trajectories import Episode, Trajectories
from igpo_jax.igpo.scoring import pseudo_turns, score_one_pass, score_per_turn
from igpo_jax.model.attention_mask import causal_mask, positions_from_valid
from igpo_jax.model.embedded import smollm2_gguf_path
from igpo_jax.model.token_logprobs import logprobs_from_hidden
from igpo_jax.model.tokenizer import load_tokenizer
from igpo_jax.model.weights import load_gguf

PROMPT, GENERATED, TOOL = 200, 100, 150
ANSWERS = ["Kesmarin", "New York City", "1987", "Dulmer valley"]


def synthetic_trajectories(batch: int, turns: int, vocab: int, seed: int = 0) -> Trajectories:
    """`batch` rollouts of exactly `turns` turns (no padding: the worst case for the one pass)."""
    length = PROMPT + turns * GENERATED + (turns - 1) * TOOL
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    turn_start = np.tile(PROMPT + np.arange(turns) * (GENERATED + TOOL), (batch, 1)).astype(np.int32)
    turn_id = np.full((batch, length), -1, np.int32)
    for t, s in enumerate(turn_start[0]):
        turn_id[:, s:s + GENERATED] = t
    episode = Episode("q", ("a",), "bench", "", "", None, "answer")
    return Trajectories(tokens_NL=tokens, valid_NL=np.ones((batch, length), bool), loss_mask_NL=turn_id >= 0,
                        turn_id_NL=turn_id, turn_start_NT=turn_start, num_turns_N=np.full(batch, turns, np.int32),
                        group_id_N=np.zeros(batch, np.int32), sampled_logprob_NL=np.zeros((batch, length), np.float32),
                        episodes=(episode,) * batch)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--turns", default="2,4,8")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    model = load_gguf(smollm2_gguf_path())
    tokenizer = load_tokenizer(smollm2_gguf_path())
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward_hidden(state, tokens_BL):
        m = nnx.merge(graphdef, state)
        valid = jnp.ones(tokens_BL.shape, bool)
        return m.hidden(tokens_BL, positions_from_valid(valid), causal_mask(valid))[0]

    @jax.jit
    def forward_logprobs(state, tokens_BL):
        m = nnx.merge(graphdef, state)
        valid = jnp.ones(tokens_BL.shape, bool)
        hidden, _ = m.hidden(tokens_BL, positions_from_valid(valid), causal_mask(valid))
        return logprobs_from_hidden(m, hidden[:, :-1], tokens_BL[:, 1:])[0]

    results = {}
    for turns in [int(t) for t in args.turns.split(",")]:
        traj = synthetic_trajectories(args.batch, turns, model.cfg.vocab_size)
        pts = pseudo_turns(tokenizer, [ANSWERS[i % len(ANSWERS)] for i in range(args.batch)])
        tokens = jnp.asarray(traj.tokens_NL)
        runs = {
            "forward": lambda: forward_hidden(state, tokens).block_until_ready(),
            "forward_logprobs": lambda: forward_logprobs(state, tokens).block_until_ready(),
            "one_pass": lambda: score_one_pass((graphdef, state), traj, pts, batch_size=args.batch),
            "per_turn": lambda: score_per_turn((graphdef, state), traj, pts),
        }
        secs = {}
        for name, fn in runs.items():
            fn()  # compile + warm up
            secs[name] = timed(fn, args.repeats)
        one = score_one_pass((graphdef, state), traj, pts, batch_size=args.batch).mean_logp_NT
        ref = score_per_turn((graphdef, state), traj, pts).mean_logp_NT
        r = {
            "length": traj.tokens_NL.shape[1],
            **{f"{k}_s": round(v, 3) for k, v in secs.items()},
            "onepass_over_forward": round(secs["one_pass"] / secs["forward"], 3),
            "onepass_over_forward_logprobs": round(secs["one_pass"] / secs["forward_logprobs"], 3),
            "speedup_vs_per_turn": round(secs["per_turn"] / secs["one_pass"], 3),
            "max_abs_diff_vs_per_turn": float(np.max(np.abs(one - ref))),
        }
        results[f"T{turns}"] = r
        print(f"T={turns} L={r['length']} batch={args.batch}: forward {secs['forward']:.2f}s, "
              f"forward+logprobs {secs['forward_logprobs']:.2f}s, one pass {secs['one_pass']:.2f}s, "
              f"per turn {secs['per_turn']:.2f}s → one pass / forward {r['onepass_over_forward']}, "
              f"speed-up vs per turn {r['speedup_vs_per_turn']}×", flush=True)
    results["devices"] = str(jax.devices())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
