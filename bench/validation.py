"""Where a validation's time goes: one config's greedy validation, each sampler device call timed.

    python -m bench.validation --config=configs/world_igpo.py
    python -m bench.validation --config=configs/world_igpo.py --variants "" \
        "rollout.val_lockstep_turns=False,rollout.val_context_length=0"

Runs `train.validate` at the base model once per variant (comma-separated `key=value` overrides of
the config; "" is the config as it is), cold then warm, the variants alternating in one process so
that their ratio holds on a busy machine. Per pass: wall, seconds compiling, and per sampler call
kind (`_decode_call`, `_extend_call`, ...) its calls, seconds and token slots (decode: steps).
Ends with one JSON line; `same_episodes` counts the episodes whose tokens equal the first
variant's, and `logp_bitwise` whether their sampled log-probs are equal bit for bit.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import jax
import numpy as np

from igpo_jax import components, train
from igpo_jax.planning.memory import load_config
from igpo_jax.rollout import sampler as sampler_lib
from igpo_jax.runtime import sharding

_CALLS = ("_decode_call", "_extend_call", "_extend_rows_call", "_shared_prefill_call", "_compact_call",
          "_release_call")


def _slots(name: str, args, out) -> int:
    """Token slots a call computed (decode: the steps it ran)."""
    if name == "_extend_call":
        return args[3].shape[0] * args[3].shape[1]
    if name == "_extend_rows_call":
        return args[4].shape[0] * args[4].shape[1]
    if name == "_decode_call":
        return int(out[4])
    return 0


def time_sampler_calls(table: dict):
    """Wrap the sampler's jitted calls: each blocks until done and adds [calls, s, slots] to table."""
    for name in _CALLS:
        real = getattr(sampler_lib, name)

        def timed(*args, real=real, name=name):
            start = time.perf_counter()
            out = jax.block_until_ready(real(*args))
            row = table[name.strip("_").removesuffix("_call")]
            row[0], row[1], row[2] = row[0] + 1, row[1] + time.perf_counter() - start, row[2] + _slots(name, args, out)
            return out
        setattr(sampler_lib, name, timed)


def apply(config, overrides: str):
    config = config.copy_and_resolve_references()
    for item in filter(None, overrides.split(",")):
        key, value = item.split("=")
        section, name = key.split(".")
        old = config[section][name]
        config[section][name] = (value == "True") if isinstance(old, bool) else type(old)(value)
    return config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/world_igpo.py")
    parser.add_argument("--variants", nargs="+", default=[""], help="comma-separated key=value overrides each")
    parser.add_argument("--passes", type=int, default=2, help="per variant: the first is cold")
    parser.add_argument("--questions", type=int, default=0, help="the first N validation questions (0: the config's)")
    args = parser.parse_args()
    components.start_program()
    base = load_config(args.config)
    mesh, rules = components.mesh_and_rules(base)
    examples = components.load_examples(components.data_files(base).test, base.data.val_max_questions)
    examples = examples[:args.questions or len(examples)]
    table = collections.defaultdict(lambda: [0, 0.0, 0])
    time_sampler_calls(table)
    trajectories, real_rollout = {}, train.rollout

    def keep(*a, **k):
        traj, stats = real_rollout(*a, **k)
        trajectories["last"] = traj
        return traj, stats
    train.rollout = keep
    results = collections.defaultdict(list)
    with sharding.activate(mesh, rules):
        policy, tokenizer = components.load_policy(base, mesh, rules)
        with components.search_backend(base, components.data_files(base).corpus) as search:
            for p in range(args.passes):
                for variant in (args.variants if p % 2 == 0 else args.variants[::-1]):
                    table.clear()
                    start = time.perf_counter()
                    out = train.validate(apply(base, variant), policy, tokenizer, search, examples, 0.0)
                    traj = trajectories["last"]
                    record = {"pass": p, "wall_s": round(time.perf_counter() - start, 2),
                              "compile_s": round(out["time/validation_compile_s"], 2), "f1": out["val/f1"],
                              "calls": {k: [c, round(s, 2), n] for k, (c, s, n) in table.items()}}
                    first = results[args.variants[0]][0]["traj"] if results[args.variants[0]] else None
                    if first is not None:
                        same = [np.array_equal(a[v], b[w]) for a, v, b, w in
                                zip(traj.tokens_NL, traj.valid_NL, first.tokens_NL, first.valid_NL)]
                        record["same_episodes"] = int(sum(same))
                        record["logp_bitwise"] = bool(traj.sampled_logprob_NL.shape == first.sampled_logprob_NL.shape
                                                      and (traj.sampled_logprob_NL == first.sampled_logprob_NL).all())
                    print(json.dumps({"variant": variant, **record}), flush=True)
                    results[variant].append({**record, "traj": traj})
    summary = {v: {"cold_s": r[0]["wall_s"], "warm_s": min(x["wall_s"] for x in r[1:]) if len(r) > 1 else None,
                   "cold_compile_s": r[0]["compile_s"], "f1": r[0]["f1"],
                   "same_episodes": r[-1].get("same_episodes"), "logp_bitwise": r[-1].get("logp_bitwise")}
               for v, r in results.items()}
    print(json.dumps({"bench": "validation", "config": args.config, "questions": len(examples), "variants": summary}))


if __name__ == "__main__":
    main()
