"""GPU check: sampler, scoring, train step and attention of a Qwen2.5-1.5B-shaped random model in bf16.

    bash launch/gpu_check.sh                     # installs jax[cuda12], then runs this
    python -m bench.gpu_check [--tiny] [--batch 64] [--prompt 512] [--new 256] ...

Random weights (no checkpoint, no tokenizer): the figures depend on shapes only.
- sampler: `sampling.Sampler.generate` from a bf16 copy (as rollouts sample), `--batch` rows of
  `--prompt` tokens, `--new` tokens each (no early stop). Decode tokens/s, and the fraction of the
  HBM roofline: bytes one decode step must read (bf16 weights + the KV cache window it attends
  over) / measured step time / HBM bandwidth.
- scoring: the teacher-forced log-prob forward the scoring and π_old/π_ref passes run
  (`update.compute_logprobs`), bf16 compute; tokens/s and MFU.
- train step: `update.train_step` (forward + backward + AdamW) on float32 master weights with bf16
  compute, the accelerator configs' setting; tokens/s and MFU (3 × forward matmul FLOPs).
- attention: one attention of the model's head shape, forward + backward, in bf16 over 3 rows of
  `--attn_length` tokens (full, 3/4 right-padded, empty): cuDNN's fused kernel as the accelerator
  configs route it (`model.gpu_fused_attention`, model/fused_attention.py) against the blockwise
  kernel. Seconds, speed-up, each one's largest difference from the fp32 blockwise result (output
  and q/k/v gradients, relative to their largest entry) and whether all is finite. Off an NVIDIA
  GPU the same call runs with implementation='xla' (`attn_kernel` says which).
MFU is against the device's dense bf16 peak and the roofline against its HBM bandwidth, both
looked up from `device_kind` (H100/H200: 989 TFLOP/s; 3.35 / 4.8 TB/s). Per DESIGN.md a peak from
one machine can mislead, so the same run also measures a large bf16 matmul and a device copy and
reports the fractions against those too (`*_measured`); on a device not in the table (a CPU with
`--tiny`) only the measured ones exist. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import forward_flops
from igpo_jax.model import attention_mask
from igpo_jax.model import config as model_config
from igpo_jax.model import fused_attention
from igpo_jax.model.blockwise_attention import blockwise_attention
from igpo_jax.model.qwen import Decoder
from igpo_jax.rollout.sampler import Sampler, SamplingParams
from igpo_jax.training.update import UpdateBatch, UpdateConfig, compute_logprobs, make_optimizer, train_step

# device_kind substring → (dense bf16 FLOP/s, HBM bytes/s), vendor figures (SXM parts)
DEVICE_PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.039e12),
}


def device_peaks(kind: str) -> tuple[float | None, float | None]:
    """(bf16 FLOP/s, HBM bytes/s) of a device kind, (None, None) when unknown. H200 is checked
    before H100 (its kind string does not contain 'H100', but keep the order explicit)."""
    for name, peaks in DEVICE_PEAKS.items():
        if name in kind.upper():
            return peaks
    return None, None


def timed(fn, repeats: int) -> float:
    """Minimum wall seconds of `fn()` (which blocks) over `repeats` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measured_matmul_flops(n: int) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: (x @ x).astype(jnp.bfloat16))
    return 2 * n ** 3 / timed(lambda: f(a).block_until_ready(), 3)


def measured_copy_bandwidth(n_bytes: int) -> float:
    """Read + write bytes per second of an elementwise pass over `n_bytes`."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001)
    return 2 * n_bytes / timed(lambda: f(x).block_until_ready(), 3)


def random_model(cfg: model_config.ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(cfg, nnx.Rngs(seed))


def param_bytes(model) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def model_shape(tiny: bool) -> model_config.ModelConfig:
    if tiny:  # Qwen2-style (qkv bias, untied), small enough for a CPU test in seconds
        return model_config.ModelConfig("qwen2", 512, 64, 128, 2, 4, 2, 16, qkv_bias=True)
    return model_config.PRESETS["Qwen2.5-1.5B-Instruct"]


def check_sampler(cfg, args) -> dict:
    model = random_model(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt).tolist() for _ in range(args.batch)]
    cache = args.prompt + args.new
    sampler = Sampler(model, None, batch_size=args.batch, cache_size=cache, params=SamplingParams(temperature=1.0),
                      steps_per_call=args.new, min_span=min(1024, cache))
    seeds = list(range(args.batch))

    def prefill():
        sampler.start(prompts, seeds, 1)
        jax.block_until_ready(sampler.cache)

    def generate():
        out = sampler.generate(prompts, seeds, args.new)
        assert all(len(o.tokens) == args.new for o in out), [len(o.tokens) for o in out]

    full_s = timed(generate, args.repeats)
    prefill_s = timed(prefill, args.repeats)
    decode_s = max(full_s - prefill_s, 1e-9)
    step_s = decode_s / args.new
    # one decode step reads every weight once and the KV window it attends over (span slots,
    # all rows, k and v, every layer); the window is the cache here (prompt + new ≤ min_span)
    span = sampler._span(cache)
    kv_bytes = 2 * cfg.num_layers * args.batch * cfg.num_kv_heads * span * cfg.head_dim * 2
    return dict(sample_tok_s=args.batch * args.new / decode_s, decode_step_ms=step_s * 1e3,
                decode_bytes_per_step=param_bytes(model) + kv_bytes, prefill_s=prefill_s)


def _batch(cfg, rows: int, length: int, seed: int = 0) -> UpdateBatch:
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, length)), jnp.int32)
    mask = np.ones((rows, length), np.float32)
    mask[:, : length // 4] = 0  # the prompt: no loss
    adv = rng.normal(size=(rows, 1)).astype(np.float32) * mask
    zeros = jnp.zeros((rows, length), jnp.float32)
    return UpdateBatch(tokens, jnp.ones((rows, length), bool), jnp.asarray(mask), jnp.asarray(adv), zeros, zeros)


def check_scoring(cfg, args) -> dict:
    model = random_model(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"))
    b = _batch(cfg, args.score_rows, args.length)
    run = lambda: compute_logprobs(model, b.tokens_NL, b.valid_NL, args.micro).block_until_ready()
    s = timed(run, args.repeats)
    tokens = args.score_rows * args.length
    return dict(score_tok_s=tokens / s, score_flops=forward_flops(cfg, tokens, args.length // 2) / s)


def check_train(cfg, args) -> dict:
    model = random_model(cfg.replace(param_dtype="float32", dtype="bfloat16", remat=True))
    ucfg = UpdateConfig(lr=1e-6, use_kl_loss=True)
    batch = _batch(cfg, args.train_rows, args.length, seed=1)
    graphdef, params = nnx.split(model)
    state = {"params": params, "opt": make_optimizer(ucfg).init(params)}

    def step():
        state["params"], state["opt"], m = train_step(graphdef, state["params"], state["opt"], batch, ucfg,
                                                     args.train_rows // args.micro, True)
        jax.block_until_ready(m["loss"])
        return m

    s = timed(step, args.repeats)
    m = step()
    tokens = args.train_rows * args.length
    # backward ≈ 2 × forward; remat adds one more forward (not counted: MFU counts useful FLOPs)
    return dict(train_tok_s=tokens / s, train_flops=3 * forward_flops(cfg, tokens, args.length // 2) / s,
                train_loss_finite=bool(np.isfinite(float(m["loss"]))), train_skipped=float(m["skipped"]))


def check_attention(cfg, args) -> dict:
    kh, g, h, t = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, args.attn_length
    kernel = "cudnn" if fused_attention.platform() == "cuda" else "xla"
    valid = np.arange(t)[None, :] < np.array([t, 3 * t // 4, 0])[:, None]
    mask = attention_mask.causal_spec(jnp.asarray(valid), right_padded=True)
    rng = np.random.default_rng(2)
    q32 = jnp.asarray(rng.normal(size=(3, t, kh, g, h)), jnp.float32)
    k32, v32 = (jnp.asarray(rng.normal(size=(3, t, kh, h)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=q32.shape), jnp.float32)
    block = min(512, t)

    def fwd_bwd(attend):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * w)
        f = jax.jit(lambda q, k, v: (attend(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))
        return lambda q, k, v: jax.block_until_ready(f(q, k, v))

    fused = fwd_bwd(lambda q, k, v: fused_attention.fused_attention(q, k, v, mask, kernel))
    blocked = fwd_bwd(lambda q, k, v: blockwise_attention(q, k, v, mask, block, block))
    bf16 = tuple(x.astype(jnp.bfloat16) for x in (q32, k32, v32))
    exact = jax.tree.leaves(blocked(q32, k32, v32))

    def error(outs) -> float:  # the largest difference from the fp32 result, relative to its scale
        return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
                   for a, b in zip(jax.tree.leaves(outs), exact))

    finite = lambda outs: all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in jax.tree.leaves(outs))
    blocked_out = blocked(*bf16)
    result = dict(attn_kernel=kernel, attn_length=t, attn_blockwise_s=timed(lambda: blocked(*bf16), args.repeats),
                  attn_blockwise_err=error(blocked_out), attn_finite=finite(blocked_out))
    try:  # cuDNN refuses what its checks refuse (e.g. head dim > 128 before Hopper): say so, keep the rest
        fused_out = fused(*bf16)
    except Exception as e:  # noqa: BLE001 (any refusal is the figure)
        return dict(result, attn_fused_error=f"{type(e).__name__}: {e}"[:300])
    result.update(attn_fused_s=timed(lambda: fused(*bf16), args.repeats), attn_fused_err=error(fused_out),
                  attn_finite=result["attn_finite"] and finite(fused_out))
    return dict(result, attn_speedup=result["attn_blockwise_s"] / result["attn_fused_s"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and shapes (CPU test)")
    parser.add_argument("--batch", type=int, default=None, help="sampler rows")
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new", type=int, default=None, help="decode steps")
    parser.add_argument("--length", type=int, default=None, help="scoring / train row length")
    parser.add_argument("--score_rows", type=int, default=None)
    parser.add_argument("--train_rows", type=int, default=None)
    parser.add_argument("--micro", type=int, default=None, help="rows per micro-batch")
    parser.add_argument("--attn_length", type=int, default=None, help="attention check row length")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    defaults = (dict(batch=4, prompt=16, new=16, length=64, score_rows=4, train_rows=4, micro=2, attn_length=40,
                     repeats=1)
                if args.tiny else
                dict(batch=64, prompt=512, new=256, length=2048, score_rows=16, train_rows=16, micro=4,
                     attn_length=8192, repeats=3))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    cfg = model_shape(args.tiny)
    dev = jax.devices()[0]
    flops_peak, hbm_peak = device_peaks(dev.device_kind)
    start = time.perf_counter()
    result = dict(device_kind=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                  model="tiny" if args.tiny else "Qwen2.5-1.5B-shaped (random)",
                  params=sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(
                      lambda: Decoder(cfg, nnx.Rngs(0))), nnx.Param))))
    result.update(check_sampler(cfg, args))
    result.update(check_scoring(cfg, args))
    result.update(check_train(cfg, args))
    result.update(check_attention(cfg, args))
    mm = measured_matmul_flops(512 if args.tiny else 8192)
    bw = measured_copy_bandwidth((16 if args.tiny else 2048) * 2 ** 20)
    step_bw = result["decode_bytes_per_step"] / (result["decode_step_ms"] / 1e3)
    result.update(
        peak_bf16_flops=flops_peak, hbm_bytes_s=hbm_peak,
        measured_bf16_matmul_flops=mm, measured_copy_bytes_s=bw,
        score_mfu=result["score_flops"] / flops_peak if flops_peak else None,
        train_mfu=result["train_flops"] / flops_peak if flops_peak else None,
        decode_hbm_roofline_frac=step_bw / hbm_peak if hbm_peak else None,
        score_mfu_measured=result["score_flops"] / mm, train_mfu_measured=result["train_flops"] / mm,
        decode_roofline_frac_measured=step_bw / bw,
        wall_s=time.perf_counter() - start)
    result = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
