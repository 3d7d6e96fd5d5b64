"""Memory plan per device, from shapes alone (no weights, no devices, no allocation): the command line.

    python -m igpo_jax.plan --preset=Qwen2.5-7B-Instruct --mesh=fsdp=8,tensor=1 --param_dtype=bfloat16 \
        --rollout_batch=512 --context=32768 --device=H100-80G
    python -m igpo_jax.plan --model_path=/ckpt/Qwen2.5-7B-Instruct --mesh=fsdp=4,tensor=2
    python -m igpo_jax.plan --config=configs/qwen2_5_7b_igpo.py [--compile] [--set KEY=VALUE ...]

What is resident and when, and how each figure is estimated: igpo_jax/planning/memory.py; with
--compile, XLA's own figures for the config's programs: igpo_jax/planning/compiled.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from typing import Sequence

import jax

from igpo_jax.model import config as model_config
from igpo_jax.planning import memory


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Per-device memory plan from shapes alone.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="an experiment config file (configs/*.py): plans its own model, mesh, "
                     "rows, context, micro-batching and dtypes")
    src.add_argument("--preset", choices=sorted(model_config.PRESETS))
    src.add_argument("--model_path", help="HF model directory (reads its config.json only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --config: override a key, e.g. --set rollout.max_concurrent_rows=64 (repeatable)")
    parser.add_argument("--devices", type=int, default=8, help="with --config: devices its mesh's -1 axis fills")
    parser.add_argument("--compile", action="store_true", help="with --config: also lower and compile the decode, "
                        "scoring and update programs for the mesh (simulated CPU devices) and print XLA's memory")
    parser.add_argument("--mesh", help="e.g. fsdp=8,tensor=1 or data=2,fsdp=4,tensor=2 (required without --config)")
    parser.add_argument("--param_dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--dtype", default=None, help="compute (and KV cache) dtype; default param_dtype")
    parser.add_argument("--rollout_batch", type=int, default=512, help="rows decoded at once")
    parser.add_argument("--context", type=int, default=32768, help="KV-cache slots per row")
    parser.add_argument("--micro_batch", type=int, default=0, help="update rows per micro-batch "
                        "(default: one per data×fsdp shard)")
    parser.add_argument("--update_len", type=int, default=0, help="update sequence length (default: context)")
    parser.add_argument("--no_reference", action="store_true", help="no reference policy (KL loss off)")
    parser.add_argument("--device", action="append", choices=sorted(memory.DEVICES), help="repeatable")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of memory kept free")
    args = parser.parse_args(argv)
    if args.config:
        return _main_config(args)
    if not args.mesh:
        parser.error("--mesh is required with --preset / --model_path")
    overrides = dict(param_dtype=args.param_dtype, dtype=args.dtype or args.param_dtype, remat=True)
    cfg = (model_config.preset(args.preset, **overrides) if args.preset
           else model_config.from_hf_dir(args.model_path, **overrides))
    mesh_shape = memory.parse_mesh(args.mesh)
    p = memory.plan(cfg, mesh_shape, rollout_batch=args.rollout_batch, context=args.context,
                    micro_batch=args.micro_batch, update_len=args.update_len, with_reference=not args.no_reference)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(memory.abstract_params(cfg)))
    text = memory.report(p, cfg, mesh_shape, total, args.device, args.headroom)
    print(text)
    return text


def _main_config(args) -> str:
    c = memory.load_config(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        *sections, name = key.split(".")
        node = c
        for section in sections:
            node = node[section]
        import ast

        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value  # a plain string
        with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
            node[name] = parsed
    cfg = memory.model_from_config(c)
    mesh_shape = memory.mesh_from_config(c, args.devices)
    st = memory.settings_from_config(c)
    if args.no_reference:
        st = dataclasses.replace(st, with_reference=False)
    p = memory.plan_settings(cfg, mesh_shape, st)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(memory.abstract_params(cfg)))
    compiled = None
    if args.compile:
        from igpo_jax.planning import compiled as compiled_lib  # XLA programs: imported only when asked

        compiled = compiled_lib.compile_all(cfg, st, mesh_shape, loss_agg_mode=c.actor.loss_agg_mode)
    text = memory.report(p, cfg, mesh_shape, total, args.device, args.headroom, compiled, st)
    print(text)
    return text


def start_simulated_devices(argv: Sequence[str]) -> None:
    """With --compile, give JAX's CPU backend enough simulated devices before it starts."""
    if "--compile" in argv:
        n = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--devices=")), 8)
        if "--devices" in argv:
            n = int(argv[argv.index("--devices") + 1])
        from igpo_jax.runtime import xla_flags

        xla_flags.add_cpu_memory_flags()  # the schedule the project's CPU programs run with
        jax.config.update("jax_num_cpu_devices", n)
        jax.config.update("jax_platforms", "cpu")


if __name__ == "__main__":
    import sys

    start_simulated_devices(sys.argv[1:])
    main()
