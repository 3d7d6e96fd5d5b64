"""The optimiser step leaf by leaf (leafwise.py: a small program per leaf, dispatched from Python)
against one program for the whole tree (update._apply_gradients_fused), SmolLM2-135M in fp32:
steady state in one process, start-up (cold and warm persistent cache) in fresh processes.

    python -m bench.optimiser_step [--repeats 5] [--startup-pairs 2] [--no-startup] [--batch 8] [--length 512] [--micro 4]

Steady state: bench.train_step's step (8 × 512 tokens, micro-batches of 4), each program warmed up
twice, then the whole train step and the optimiser step alone (`_apply_gradients` on one set of
gradients) timed alternately, leafwise / fused, `--repeats` times each; medians and every reading.
Start-up: a fresh process per program and cache state (the cache in a new temporary directory,
cold, then the same directory again, warm) loads the model, then calls `_apply_gradients` twice;
start-up = first call − second call, with JAX's own trace / lower / compile-or-load seconds of the
first call. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROGRAMS = ("leafwise", "fused")


def _gradients_and_state(args):
    import jax
    import jax.numpy as jnp

    from bench.train_step import setup
    from igpo_jax.training import update

    model, graphdef, params, opt_state, batch, cfg, *_ = setup(args)
    loss, grads, _ = update._gradient_program(graphdef, params)(graphdef, params, batch, cfg, args.batch // args.micro,
                                                                True, None)
    jax.block_until_ready(grads)
    return graphdef, params, opt_state, batch, cfg, jnp.asarray(loss), grads


def steady(args) -> dict:
    import jax

    from igpo_jax.runtime import host_memory
    from igpo_jax.training import update

    host_memory.configure()
    with host_memory.retained():
        graphdef, params, opt_state, batch, cfg, loss, grads = _gradients_and_state(args)
        state = {"params": params, "opt": opt_state}

        def optimiser(program):
            update.OPTIMISER_PROGRAM = program
            tic = time.perf_counter()
            state["params"], state["opt"], m = update._apply_gradients(state["params"], state["opt"], grads, loss, cfg)
            jax.block_until_ready((state["params"], state["opt"], m))
            return time.perf_counter() - tic

        def step(program):
            update.OPTIMISER_PROGRAM = program
            tic = time.perf_counter()
            state["params"], state["opt"], m = update.train_step(graphdef, state["params"], state["opt"], batch, cfg,
                                                                 args.batch // args.micro, True)
            jax.block_until_ready((state["params"], state["opt"], m))
            return time.perf_counter() - tic

        first = {p: round(optimiser(p), 3) for p in PROGRAMS}  # includes building each program
        for p in PROGRAMS:  # warm-ups
            optimiser(p)
            step(p)
            step(p)
        readings = {f"{kind}_{p}": [] for kind in ("optimiser", "step") for p in PROGRAMS}
        for _ in range(args.repeats):
            for p in PROGRAMS:
                readings[f"optimiser_{p}"].append(round(optimiser(p), 4))
            for p in PROGRAMS:
                readings[f"step_{p}"].append(round(step(p), 3))
    med = {k: statistics.median(v) for k, v in readings.items()}
    return dict(first_call_s=first, readings=readings, **{f"{k}_s": round(v, 4) for k, v in med.items()},
                optimiser_ratio=round(med["optimiser_leafwise"] / med["optimiser_fused"], 3),
                step_ratio=round(med["step_leafwise"] / med["step_fused"], 4),
                step_saving_s=round(med["step_leafwise"] - med["step_fused"], 3))


def startup_child(program: str) -> None:
    import jax

    from igpo_jax.runtime import compilation_cache
    from igpo_jax.training import update

    compilation_cache.enable()
    compilation_cache.counts()  # starts counting
    events = {"/jax/core/compile/jaxpr_trace_duration": "trace", "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
              "/jax/core/compile/backend_compile_duration": "compile_or_load",
              "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read"}
    seen = dict.fromkeys(events.values(), 0.0)
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, d, **kw: seen.__setitem__(events[e], seen[events[e]] + d) if e in events else None)
    import jax.numpy as jnp
    from flax import nnx

    from igpo_jax.model.embedded import smollm2_gguf_path
    from igpo_jax.model.weights import load_gguf

    model = load_gguf(smollm2_gguf_path(), dtype="float32")
    _, params = nnx.split(model)
    cfg = update.UpdateConfig(lr=1e-6, use_kl_loss=False)
    opt_state = update.make_optimizer(cfg).init(params)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-4, jnp.float32), params)
    loss = jnp.float32(1.0)
    jax.block_until_ready((opt_state, grads))
    update.OPTIMISER_PROGRAM = program
    seen = seen.fromkeys(seen, 0.0)
    before = compilation_cache.counts()
    times, cpu = [], []
    for _ in range(2):
        tic, tic_cpu = time.perf_counter(), time.process_time()
        params, opt_state, m = update._apply_gradients(params, opt_state, grads, loss, cfg)
        jax.block_until_ready((params, opt_state, m))
        times.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - tic_cpu)
        if len(times) == 1:
            first_phases = {k: round(v, 3) for k, v in seen.items()}
            counts = compilation_cache.counts()
    print("STARTUP", json.dumps(dict(program=program, first_s=round(times[0], 3), second_s=round(times[1], 3),
                                     startup_s=round(times[0] - times[1], 3), startup_cpu_s=round(cpu[0] - cpu[1], 3),
                                     **first_phases, programs=counts.programs - before.programs,
                                     compiled=counts.compiled - before.compiled, cache_hits=counts.hits - before.hits)))


def startup(pairs: int) -> dict:
    out = {p: {"cold": [], "warm": []} for p in PROGRAMS}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            for p in PROGRAMS:
                cache = os.path.join(tmp, f"{p}_{i}")
                for label in ("cold", "warm"):
                    env = dict(os.environ, IGPO_JAX_COMPILATION_CACHE=cache,
                               IGPO_JAX_WEIGHTS_CACHE=os.path.join(tmp, "weights"))
                    proc = subprocess.run([sys.executable, "-m", "bench.optimiser_step", "--startup-child", p],
                                          env=env, capture_output=True, text=True, timeout=900, cwd=root)
                    if proc.returncode:
                        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
                    line = [x for x in proc.stdout.splitlines() if x.startswith("STARTUP ")][-1].split(" ", 1)[1]
                    out[p][label].append(json.loads(line))
                    print(f"[startup {p} {label}] {line}", flush=True)
    return {f"startup_{p}_{label}_s": round(statistics.median(r["startup_s"] for r in out[p][label]), 3)
            for p in PROGRAMS for label in ("cold", "warm")} | {"startup_readings": out}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--startup-pairs", type=int, default=2)
    parser.add_argument("--no-startup", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--micro", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--startup-child", choices=PROGRAMS)
    args = parser.parse_args()
    if args.startup_child:
        startup_child(args.startup_child)
        return
    args.dtype = "float32"
    result = dict(bench="optimiser_step", batch=args.batch, length=args.length, micro_batch=args.micro)
    result.update(steady(args))
    print("STEADY", json.dumps(result), flush=True)
    if not args.no_startup:
        result.update(startup(args.startup_pairs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
