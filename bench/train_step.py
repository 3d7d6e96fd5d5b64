"""Train step (forward + backward + AdamW), SmolLM2-135M, 8 × 512 tokens: ours vs transformers + torch.

    python -m bench.train_step [--batch 8] [--length 512] [--micro 4] [--repeats 3] [--dtype bfloat16]
                               [--malloc default] [--optimiser auto|leafwise|fused]

Ours: `update.train_step` (token log-probs, dual-clip PPO loss, global-norm clipping, AdamW),
jitted, params and optimiser state donated; the 8 rows run as micro-batches of `--micro` rows whose
gradients are summed before the one AdamW step (the same update as one 8-row pass; 4 rows keep
the activations cache-friendly: per token, 8 rows in one pass were measured ~20% slower).
The optimiser step runs as `update.OPTIMISER_PROGRAM` says (`--optimiser`, default 'auto' as in
a run: leaf by leaf until the whole-tree program, built in the background from the second step
on, is ready); `fused_steps` says how many of the timed steps ran the whole-tree program.
Reference: the same model in torch (fp32), a token-level policy-gradient loss on log_softmax of
the full logits, backward, clip, AdamW.
Both fp32 on the CPU in one process by default. `--dtype bfloat16` is mixed precision on both
sides: fp32 weights, gradients and AdamW state, bf16 matmul inputs (ours: the model's compute
dtype; the reference: `torch.autocast("cpu", torch.bfloat16)`). The last line is one JSON object.

Host memory is the same for both, and it matters: with glibc's defaults each step gets its
temporaries (4.5 GB for ours at 4 × 512) as fresh pages that the kernel faults in and zeroes,
1.2–2.3 M page faults and 4–13 CPU-seconds in the kernel per step on either side. `--malloc
retained` (the default) runs both inside `host_memory.retained()`, where freed buffers stay in
the heap for the next step; `--malloc default` leaves glibc as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import CPU_MATMUL_PEAK_FLOPS, forward_flops, reference_smollm2, timed
from igpo_jax.runtime import host_memory
from igpo_jax.model.embedded import smollm2_gguf_path
from igpo_jax.model.weights import load_gguf
from igpo_jax.training import update
from igpo_jax.training.update import UpdateBatch, UpdateConfig, make_optimizer, train_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--micro", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of both models (weights and optimiser state stay fp32)")
    parser.add_argument("--malloc", default="retained", choices=("retained", "default"),
                        help="both sides: freed host memory kept for the next step, or glibc's defaults")
    parser.add_argument("--optimiser", default="auto", choices=("auto", "leafwise", "fused"),
                        help="ours: update.OPTIMISER_PROGRAM")
    args = parser.parse_args()
    update.OPTIMISER_PROGRAM = args.optimiser
    if args.malloc == "retained":
        host_memory.configure()  # one malloc arena: before JAX starts its threads
    with host_memory.retained() if args.malloc == "retained" else contextlib.nullcontext():
        result = compare(args)
    print(f"ours {result['ours_tok_s']} tok/s, transformers {result['ref_tok_s']} tok/s, ratio {result['ratio']}")
    print(json.dumps(result))


def setup(args):
    """(model, graphdef, params, optimiser state, batch, cfg, tokens, mask, advantage) of our step."""
    b, length = args.batch, args.length
    model = load_gguf(smollm2_gguf_path(), dtype=args.dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.cfg.vocab_size, (b, length)).astype(np.int32)
    mask = np.ones((b, length), np.float32)
    mask[:, : length // 4] = 0  # a prompt without loss
    advantage = rng.normal(size=(b, 1)).astype(np.float32) * mask
    cfg = UpdateConfig(lr=1e-6, use_kl_loss=False)
    batch = UpdateBatch(jnp.asarray(tokens), jnp.ones((b, length), bool), jnp.asarray(mask), jnp.asarray(advantage),
                        jnp.zeros((b, length)), jnp.zeros((b, length)))
    graphdef, params = nnx.split(model)
    opt_state = make_optimizer(cfg).init(params)
    return model, graphdef, params, opt_state, batch, cfg, tokens, mask, advantage


def compare(args) -> dict:
    """Times both train steps; the result's figures."""
    b, length = args.batch, args.length
    model, graphdef, params, opt_state, batch, cfg, tokens, mask, advantage = setup(args)
    state = {"params": params, "opt": opt_state}

    def ours():
        state["params"], state["opt"], m = train_step(graphdef, state["params"], state["opt"], batch, cfg,
                                                     b // args.micro, True)
        jax.block_until_ready(m["loss"])

    # two warm-ups: the first compiles; with memory retained, the heap reaches its size in the second
    ours()
    ours()
    used = update._fused_when_ready.used
    ours_s = timed(ours, args.repeats)
    fused_steps = args.repeats if args.optimiser == "fused" else update._fused_when_ready.used - used

    import torch

    ref = reference_smollm2().train()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-6, weight_decay=0.01)
    ids = torch.tensor(tokens, dtype=torch.long)
    t_mask = torch.tensor(mask[:, 1:])
    t_adv = torch.tensor(advantage[:, 1:])

    def reference():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            logits = ref(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        ratio = torch.exp(logp - logp.detach())
        loss = (-(t_adv * ratio) * t_mask).sum() / t_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        optimizer.step()

    reference()
    reference()
    ref_s = timed(reference, args.repeats)

    n_tokens = b * length
    flops = 3 * forward_flops(model.cfg, n_tokens, length / 2)
    result = {
        "bench": "train_step", "batch": b, "length": length, "micro_batch": args.micro, "dtype": args.dtype,
        "ours_s": round(ours_s, 3), "ref_s": round(ref_s, 3),
        "ours_tok_s": round(n_tokens / ours_s, 1), "ref_tok_s": round(n_tokens / ref_s, 1),
        "ratio": round(ref_s / ours_s, 3),
        # against the fp32 peak (only meaningful for fp32 compute); the FLOPs of the full model
        # for both, though ours skips the vocab projection of the prompt positions
        **{f"{side}_frac_of_matmul_peak": (round(flops / s / CPU_MATMUL_PEAK_FLOPS, 3)
                                           if args.dtype == "float32" else None)
           for side, s in (("ours", ours_s), ("ref", ref_s))},
        "malloc": args.malloc, "optimiser": args.optimiser, "fused_steps": fused_steps,
        "devices": str(jax.devices()),
    }
    return result


if __name__ == "__main__":
    main()
