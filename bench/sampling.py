"""Sampling throughput, SmolLM2-135M, batch 16 × 128 new tokens: ours vs transformers `generate`.

    python -m bench.sampling [--batch 16] [--new 128] [--prompt 64] [--dtype bfloat16] [--cache 4096]
    python -m bench.sampling --prefill [--questions 2] [--group 4] [--prompt 220]   # shared prefill

`--prefill` times only a rollout's prefill phase (`Sampler.start`: G rows per question, the same
prompt within a group) with `share_prompt_prefill` on and off, in the same run, and ends with its
own JSON line (`shared_s`, `per_row_s`, `ratio` = per_row / shared).

Same settings in both (temperature 1.0, top-p 1.0, no early stop: every row makes exactly `new`
tokens), fp32 on the CPU, one process. `--dtype bfloat16` holds the weights and the KV cache of
both in bf16 (the reference's rollout engine samples from bf16 weights too). The last line is
one JSON object; `roofline_frac` compares our decode rate with the DRAM-bandwidth bound (weights
+ KV cache read once per step).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import reference_smollm2, timed
from igpo_jax.model.embedded import smollm2_gguf_path
from igpo_jax.model.weights import load_gguf
from igpo_jax.rollout.sampler import Sampler, SamplingParams

DRAM_BYTES_PER_S = 10e9  # measured read bandwidth of the dev machine (DESIGN.md)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights, activations and KV cache of both samplers")
    parser.add_argument("--cache", type=int, default=0,
                        help="our KV-cache slots (default: prompt + new + 16), as a rollout sizes it for its "
                             "longest episode; transformers' cache grows with the text")
    parser.add_argument("--min_span", type=int, default=1024, help="Sampler(min_span=...)")
    parser.add_argument("--prefill", action="store_true", help="time the prefill phase, shared vs per row")
    parser.add_argument("--questions", type=int, default=2, help="--prefill: distinct prompts")
    parser.add_argument("--group", type=int, default=4, help="--prefill: rows per prompt (rollout.n)")
    args = parser.parse_args()

    model = load_gguf(smollm2_gguf_path(), param_dtype=args.dtype, dtype=args.dtype)
    if args.prefill:
        return prefill(model, args)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, cfg.vocab_size, args.prompt).tolist() for _ in range(args.batch)]
    cache_size = args.cache or args.prompt + args.new + 16
    if cache_size < args.prompt + args.new:
        parser.error(f"--cache {cache_size} cannot hold {args.prompt} + {args.new} tokens")
    sampler = Sampler(model, None, batch_size=args.batch, cache_size=cache_size,
                      params=SamplingParams(temperature=1.0), steps_per_call=args.new, min_span=args.min_span)
    seeds = list(range(args.batch))
    run_ours = lambda: sampler.generate(prompts, seeds, args.new)
    out = run_ours()  # compile + warm up
    assert all(len(o.tokens) == args.new for o in out)
    ours_s = timed(run_ours, args.repeats)

    import torch

    ref = reference_smollm2(args.dtype)
    ids = torch.tensor(prompts)

    def run_ref():
        torch.manual_seed(0)
        with torch.no_grad():
            return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new,
                                min_new_tokens=args.new, pad_token_id=0)

    run_ref()
    ref_s = timed(run_ref, args.repeats)

    n_tokens = args.batch * args.new
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    mean_context = args.prompt + args.new / 2
    kv_bytes = (2 * cfg.num_layers * args.batch * mean_context * cfg.num_kv_heads * cfg.head_dim
                * jnp.dtype(args.dtype).itemsize)
    step_s_bound = (weight_bytes + kv_bytes) / DRAM_BYTES_PER_S
    ours_tok_s = n_tokens / ours_s
    result = {
        "bench": "sampling", "batch": args.batch, "new_tokens": args.new, "prompt_tokens": args.prompt,
        "dtype": args.dtype, "cache_slots": cache_size, "min_span": args.min_span,
        "ours_s": round(ours_s, 3), "ref_s": round(ref_s, 3),
        "ours_tok_s": round(ours_tok_s, 1), "ref_tok_s": round(n_tokens / ref_s, 1),
        "ratio": round(ref_s / ours_s, 3),
        "roofline_tok_s": round(args.batch / step_s_bound, 1),
        "roofline_frac": round(ours_tok_s / (args.batch / step_s_bound), 3),
        "devices": str(jax.devices()),
    }
    print(f"ours {result['ours_tok_s']} tok/s, transformers {result['ref_tok_s']} tok/s, ratio {result['ratio']}")
    print(json.dumps(result))


def prefill(model, args):
    """The demo's prefill: questions × group rows, one prompt per question; shared vs per row."""
    prompt = args.prompt if args.prompt != 64 else 220  # the demo's prompt is ≈ 220 tokens
    rng = np.random.default_rng(0)
    distinct = [rng.integers(100, model.cfg.vocab_size, prompt - q).tolist() for q in range(args.questions)]
    prompts = [p for p in distinct for _ in range(args.group)]
    rows = len(prompts)
    # 1024 slots (one min_span window): what the prefill attends over either way; a 4096-slot
    # cache only adds its allocation (1.5 GB at 8 rows, paid alike on both sides) to the phase
    cache_size = args.cache or 1024

    def phase(share):
        sampler = Sampler(model, None, batch_size=rows, cache_size=cache_size, min_span=args.min_span,
                          params=SamplingParams(temperature=1.0), share_prompt_prefill=share)

        def run():
            sampler.start(prompts, list(range(rows)), 1)
            jax.block_until_ready(sampler.cache)

        run()  # compile + warm up
        return timed(run, args.repeats)

    shared_s, per_row_s = phase(True), phase(False)
    result = {"bench": "sampling_prefill", "questions": args.questions, "group": args.group, "prompt_tokens": prompt,
              "dtype": args.dtype, "cache_slots": cache_size, "shared_s": round(shared_s, 4),
              "per_row_s": round(per_row_s, 4), "ratio": round(per_row_s / shared_s, 3),
              "devices": str(jax.devices())}
    print(f"prefill of {rows} rows ({args.questions} prompts × {args.group}): shared {shared_s:.3f} s, "
          f"per row {per_row_s:.3f} s, ratio {result['ratio']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
