"""Teacher-forced log-probs, SmolLM2-135M, 16 × 512 tokens: ours (jitted) vs transformers + torch.

    python bench/forward.py [--batch 16] [--length 512] [--repeats 3]

Both run fp32 on the CPU in the same process; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import CPU_MATMUL_PEAK_FLOPS, forward_flops, reference_smollm2, timed
from igpo_jax.model.attention_mask import causal_mask, positions_from_valid
from igpo_jax.model.embedded import smollm2_gguf_path
from igpo_jax.model.token_logprobs import logprobs_from_hidden
from igpo_jax.model.weights import load_gguf


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = load_gguf(smollm2_gguf_path())
    cfg = model.cfg
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.length)).astype(np.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def ours_logprobs(state, tokens_BT):
        m = nnx.merge(graphdef, state)
        valid = jnp.ones(tokens_BT.shape, bool)
        hidden, _ = m.hidden(tokens_BT, positions_from_valid(valid), causal_mask(valid))
        return logprobs_from_hidden(m, hidden[:, :-1], tokens_BT[:, 1:])[0]

    ours = ours_logprobs(state, tokens).block_until_ready()  # compile + warm up
    ours_s = timed(lambda: ours_logprobs(state, tokens).block_until_ready(), args.repeats)

    import torch

    ref_model = reference_smollm2()
    ids = torch.tensor(tokens, dtype=torch.long)

    def ref_logprobs():
        with torch.no_grad():
            logits = ref_model(input_ids=ids).logits[:, :-1]
            return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]

    ref = ref_logprobs()
    ref_s = timed(ref_logprobs, args.repeats)

    max_diff = float(np.max(np.abs(np.asarray(ours) - ref.numpy())))
    n_tokens = args.batch * args.length
    flops = forward_flops(cfg, n_tokens, args.length / 2)
    result = {
        "bench": "forward_logprobs", "batch": args.batch, "length": args.length,
        "ours_s": round(ours_s, 3), "ref_s": round(ref_s, 3),
        "ours_tok_s": round(n_tokens / ours_s, 1), "ref_tok_s": round(n_tokens / ref_s, 1),
        "ratio": round(ref_s / ours_s, 3),
        "ours_frac_of_matmul_peak": round(flops / ours_s / CPU_MATMUL_PEAK_FLOPS, 3),
        "max_abs_logprob_diff": max_diff,
        "devices": str(jax.devices()),
    }
    print(f"ours {result['ours_tok_s']} tok/s, transformers {result['ref_tok_s']} tok/s, ratio {result['ratio']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
