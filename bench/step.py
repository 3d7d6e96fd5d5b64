"""One RL step (rollout → scoring → π_old → π_ref → update) with every saving on and with every
saving off, for configs/demo.py's shape and a G = 16 shape, in one process; then the start-up
time of a run with the persistent compilation cache cold and warm.

    python -m bench.step [--shapes demo,g16] [--repeats 1] [--no-startup] [--startup-pairs 3]
    python -m bench.step --shapes "" [--startup-pairs 3]     # the start-up alone

The savings (issue 17), each a config switch that is on by default:
- rollout: the G rollouts of a question prefill their shared prompt once (sampler
  `share_prompt_prefill`, when the sampler has it);
- π_old: none for a one-step update (ρ = 1 exactly), else the IG scoring pass's log-probs
  (`actor.recompute_old_logp=False`); off: a forward of the policy over every row;
- update and π_ref: each group's prompt computed once for its G rows (`actor.share_prompt_prefix`);
- start-up: the persistent compilation cache (compilation_cache.py) and the GGUF weights cache
  (model/gguf_file.py).
A step is what train.py does (its `old_logp_source` and `prefix_layout` decide), on SmolLM2-135M
with the embedded world's questions and mock search (deterministic results), overlap off so both
sides roll out the same tokens. Every measured step starts from the same params (restored), so
on and off see the same trajectories and must give the same loss (printed, and checked).

Start-up: a fresh process (imports, model, world, one step, then a second step) with new,
empty cache directories, then again with the same directories; start-up = time to the end of the
first step − the second step's time (what a run pays before it reaches its steady pace); three
such cold/warm pairs by default, each with its own caches, and the ratio of their medians (of two
pairs the median is the mean: one cold start of 64 s against 31-36 s moved it to 0.25). That
difference of two ~25 s steps carries their noise (±2 s here); `startup_phases_*` is the same
start-up summed from its phases (imports, model, reference, then the first step's tracing,
lowering and compiling or loading), which leaves out the steps' compute and its noise.
Identical rows (issue 32, `--dedup demo,world`): the scoring, π_ref and update phases of a
step with identical rollouts computed once (actor.dedup_rows, actor.skip_rows_without_gradient)
and without, on the demo's shape (4 questions × 4, mini-batches of 8 in micro-batches of 2) and
world_igpo's (micro-batches of 8: a shared prompt prefix, groups of G_u rows). The rollouts are
the base model's on the world's questions with its local search, made to repeat as the policy's
do in training: each group keeps as many distinct responses as a real demo run's groups had
(`DEMO_DISTINCT_PER_GROUP`) and its other rows copy them. Both sides score and update the same
rows from the same params, so they must give the same loss.

The last line is one JSON object: per shape on_s, off_s, ratio (off / on) and the phases; the
start-up seconds cold and warm and their ratio; with --dedup, per shape the phases on and off.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_T0 = time.perf_counter()

SHAPES = {  # questions per step, rollouts per question (G), rows per optimiser step and per micro-batch
    # the demo's two optimiser steps per RL step (its 16 rows in mini-batches of 8), halved: π_old
    # comes from the scoring pass; micro-batches of whole groups, so the update shares the prompt
    "demo": dict(questions=2, n=4, mini=4, micro=4),
    "g16": dict(questions=1, n=16, mini=16, micro=16),  # one optimiser step: ρ = 1, no π_old forward
}
PHASES = ("rollout", "scoring", "old_logp", "ref_logp", "update")

# Distinct responses in each group of 4 of a real demo run (configs/demo.py, 2026-12-07; its
# samples of steps 4, 8 and 12, responses compared as text): 6, 9 and 5 of 16.
DEMO_DISTINCT_PER_GROUP = ((1, 2, 1, 2), (3, 3, 2, 1), (1, 1, 1, 2))
DEDUP_SHAPES = {"demo": 2, "world": 8}  # micro-batch rows: demo's, and world_igpo's (whole groups)
DEDUP_PHASES = ("scoring", "ref_logp", "update")


def make_config(shape: dict, on: bool, run_dir: str):
    from configs.demo import get_config

    c = get_config()
    c.run_dir = run_dir
    c.search.mock_mode = True
    c.rollout.overlap_search = False  # a fixed decode/append schedule: the same tokens on both sides
    c.data.train_batch_size, c.rollout.n = shape["questions"], shape["n"]
    c.actor.ppo_mini_batch_size, c.actor.micro_batch_size = shape["mini"], shape["micro"]
    # the demo's 512 slots end most episodes at 'context' before the second turn (measured with
    # mock search: ≤ 9 generated tokens of 24); 1024 lets both turns run
    c.rollout.context_length = max(c.rollout.context_length, 1024)
    c.actor.recompute_old_logp = not on
    c.actor.share_prompt_prefix = on
    return c


def update_inputs(config, ucfg, traj, scores, advantage_NL, old_source: str):
    """What train.update_batch builds, for one process on one device: (the update's rows as device
    arrays, π_old from the scoring pass where that is its source; split_N and the shared-prefix
    layout or None; the keyword arguments of compute_logprobs that share the prompts)."""
    import jax.numpy as jnp
    import numpy as np

    from igpo_jax.train import padded_length, prefix_layout, update_rows

    length = padded_length(traj.tokens_NL.shape[1])
    rows = {k: jnp.asarray(v) for k, v in update_rows(traj, advantage_NL, length).items()}
    if old_source == "scoring":
        rows["old_logp_NL"] = jnp.asarray(np.pad(scores.token_logp_NL, ((0, 0), (0, length - traj.tokens_NL.shape[1]))))
    split_N, layout = prefix_layout(config, ucfg, traj, traj.num_rollouts)
    shared = {}
    if layout is not None:
        rows["prefix_len_N"] = jnp.asarray(split_N)
        shared = dict(prefix_len_N=rows["prefix_len_N"], layout=layout, needed_NL=rows["loss_mask_NL"] > 0)
    return rows, split_N, layout, shared


class Step:
    """The models, search and data of one shape; `run(on)` times one RL step from the initial params."""

    def __init__(self, shape: dict, run_dir: str, policy=None, tokenizer=None):
        import jax
        from flax import nnx

        from igpo_jax import components

        self.shape = shape
        base = make_config(shape, True, run_dir)
        self.files = components.data_files(base)
        self.examples = components.load_examples(self.files.train)[:shape["questions"]]
        if policy is None:
            policy, tokenizer = components.load_policy(base)
        self.policy, self.tokenizer = policy, tokenizer
        self.reference = components.frozen_copy(policy)
        self.initial = jax.tree.map(jax.numpy.copy, nnx.state(policy))
        self.run_dir = run_dir

    def run(self, on: bool):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from igpo_jax import components
        from igpo_jax.rollout.episodes import make_sampler, rollout, row_seeds
        from igpo_jax.igpo import pipeline, scoring
        from igpo_jax.rollout.sampler import Sampler
        from igpo_jax.train import algorithm_config, old_logp_source, update_config
        from igpo_jax.training.update import UpdateBatch, Updater, compute_logprobs

        config = make_config(self.shape, on, self.run_dir)
        num_rows = self.shape["questions"] * self.shape["n"]
        nnx.update(self.policy, jax.tree.map(jnp.copy, self.initial))  # every step from the same params
        ucfg, alg = update_config(config), algorithm_config(config)
        updater = Updater(self.policy, ucfg)
        rcfg, extra = components.rollout_config(config), {}
        if "share_prompt_prefill" in {f.name for f in dataclasses.fields(rcfg)}:
            rcfg = dataclasses.replace(rcfg, share_prompt_prefill=on)
        elif "share_prompt_prefill" in inspect.signature(Sampler.__init__).parameters:
            extra = {"share_prompt_prefill": on}
        prefill_shared = bool(getattr(rcfg, "share_prompt_prefill", extra.get("share_prompt_prefill", False)))
        sampler = make_sampler(self.policy, self.tokenizer, rcfg, num_rows, **extra)
        old_source = old_logp_source(config, ucfg, num_rows)
        times = {}
        with components.search_backend(config, self.files.corpus) as search:
            tic = time.perf_counter()
            traj, _ = rollout(self.examples, self.shape["n"], sampler, self.tokenizer, search, rcfg,
                              seeds=row_seeds(7, num_rows))
            times["rollout"] = time.perf_counter() - tic

        tic = time.perf_counter()
        pts = scoring.pseudo_turns(self.tokenizer, [pipeline.ANSWER_SPLIT.join(ep.golden_answers)
                                                    for ep in traj.episodes], config.algorithm.pseudo_turn_template)
        scores = scoring.score_one_pass(self.policy, traj, pts, config.algorithm.scoring_batch_size,
                                        token_logprobs=old_source == "scoring")
        outcomes = pipeline.score_outcomes(traj, rcfg.dialect, alg.format_penalty)
        advantage_NL, _ = pipeline.advantages_for(traj, outcomes, scores.mean_logp_NT, scores.valid_NT, alg, 0, 4)
        times["scoring"] = time.perf_counter() - tic

        tic = time.perf_counter()
        rows, split_N, layout, shared = update_inputs(config, ucfg, traj, scores, advantage_NL, old_source)
        micro = ucfg.micro_batch_size
        if old_source == "recompute":
            rows["old_logp_NL"] = jax.block_until_ready(
                compute_logprobs(self.policy, rows["tokens_NL"], rows["valid_NL"], micro, **shared))
        times["old_logp"] = time.perf_counter() - tic

        tic = time.perf_counter()
        ref = jax.block_until_ready(compute_logprobs(self.reference, rows["tokens_NL"], rows["valid_NL"], micro,
                                                     **shared))
        times["ref_logp"] = time.perf_counter() - tic

        tic = time.perf_counter()
        batch = UpdateBatch(**{"old_logp_NL": None, **rows}, ref_logp_NL=ref)
        metrics = jax.block_until_ready(updater.update(batch, layout=layout))
        times["update"] = time.perf_counter() - tic
        info = dict(loss=float(metrics[-1]["loss"]), kl_ref=float(metrics[-1]["kl_ref"]), old_source=old_source,
                    layout=None if layout is None else dataclasses.astuple(layout), rows=num_rows,
                    tokens=int(traj.valid_NL.sum()), prompt_tokens=None if split_N is None else int(split_N[0]),
                    prefill_shared=prefill_shared,
                    tokens_hash=hashlib.sha1(traj.tokens_NL.tobytes()).hexdigest()[:16])
        return times, info


def bench_shape(name: str, step: Step, repeats: int) -> dict:
    for on in (True, False):  # warm-up: compile both sides' programs
        step.run(on)
    result = {}
    for on in (True, False):
        runs = [step.run(on) for _ in range(repeats)]
        times = {p: min(r[0][p] for r in runs) for p in PHASES}
        result["on" if on else "off"] = (times, runs[0][1])
    (t_on, i_on), (t_off, i_off) = result["on"], result["off"]
    on_s, off_s = sum(t_on.values()), sum(t_off.values())
    print(f"[{name}] {i_on['rows']} rows, {i_on['tokens']} tokens, prompt {i_on['prompt_tokens']} tokens; "
          f"on: π_old {i_on['old_source']}, layout {i_on['layout']}, prefill shared {i_on['prefill_shared']}; "
          f"off: π_old {i_off['old_source']}")
    for p in PHASES:
        print(f"  {p:9s} on {t_on[p]:7.3f} s   off {t_off[p]:7.3f} s   off/on {t_off[p] / max(t_on[p], 1e-9):5.2f}")
    print(f"  total     on {on_s:7.3f} s   off {off_s:7.3f} s   off/on {off_s / on_s:5.2f}")
    print(f"  loss on {i_on['loss']:.8f}  off {i_off['loss']:.8f}   kl_ref on {i_on['kl_ref']:.3e} off {i_off['kl_ref']:.3e}")
    assert i_on["tokens_hash"] == i_off["tokens_hash"], "on and off rolled out different tokens"
    assert abs(i_on["loss"] - i_off["loss"]) <= 1e-5 * max(1.0, abs(i_off["loss"])), (i_on["loss"], i_off["loss"])
    return dict(on_s=round(on_s, 3), off_s=round(off_s, 3), ratio=round(off_s / on_s, 3),
                loss_on=i_on["loss"], loss_off=i_off["loss"],
                phases_on={p: round(t, 3) for p, t in t_on.items()},
                phases_off={p: round(t, 3) for p, t in t_off.items()})


def with_repeats(traj, distinct_per_group, n: int):
    """`traj` with k = distinct_per_group[q] distinct rollouts in group q: its first k distinct rows
    (fewer where the base model already repeated itself more), row j of the group a copy of the
    (j mod k)-th of them."""
    import numpy as np

    first = traj.first_identical_N()
    source = []
    for q, k in enumerate(distinct_per_group):
        distinct = [i for i in range(q * n, (q + 1) * n) if first[i] == i][:k]
        source += [distinct[j % len(distinct)] for j in range(n)]
    source = np.asarray(source)
    arrays = {f.name: getattr(traj, f.name)[source] for f in dataclasses.fields(traj) if f.name != "episodes"}
    return dataclasses.replace(traj, **arrays, episodes=tuple(traj.episodes[i] for i in source))


class DedupStep:
    """Base-model rollouts of 4 questions × 4 on the world, then `run(traj, on)`: the scoring, π_ref
    and update phases of train.py with the identical-row savings on or off, from the initial params."""

    def __init__(self, micro: int, run_dir: str, policy=None, tokenizer=None):
        import jax
        from flax import nnx

        from igpo_jax import components
        from igpo_jax.rollout.episodes import make_sampler, rollout, row_seeds

        self.micro, self.run_dir = micro, run_dir
        config = self.config(True)
        files = components.data_files(config)
        examples = components.load_examples(files.train)[:config.data.train_batch_size]
        if policy is None:
            policy, tokenizer = components.load_policy(config)
        self.policy, self.tokenizer = policy, tokenizer
        self.reference = components.frozen_copy(policy)
        self.initial = jax.tree.map(jax.numpy.copy, nnx.state(policy))
        rcfg = components.rollout_config(config)
        rows = config.data.train_batch_size * config.rollout.n
        with components.search_backend(config, files.corpus) as search:
            self.traj, _ = rollout(examples, config.rollout.n, make_sampler(policy, tokenizer, rcfg, rows), tokenizer,
                                   search, rcfg, seeds=row_seeds(7, rows))

    def config(self, on: bool):
        from configs.demo import get_config

        c = get_config()
        c.run_dir = self.run_dir
        c.actor.micro_batch_size = self.micro
        c.actor.dedup_rows = c.actor.skip_rows_without_gradient = on
        return c

    def run(self, traj, on: bool):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from igpo_jax.igpo import pipeline, scoring
        from igpo_jax.train import algorithm_config, old_logp_source, row_facts, update_config
        from igpo_jax.training import row_selection
        from igpo_jax.training.update import UpdateBatch, Updater, compute_logprobs

        config = self.config(on)
        n = traj.num_rollouts
        nnx.update(self.policy, jax.tree.map(jnp.copy, self.initial))
        ucfg, alg = update_config(config), algorithm_config(config)
        updater, old_source, times = Updater(self.policy, ucfg), old_logp_source(config, ucfg, n), {}
        tic = time.perf_counter()
        pts = scoring.pseudo_turns(self.tokenizer, [pipeline.ANSWER_SPLIT.join(ep.golden_answers)
                                                    for ep in traj.episodes], config.algorithm.pseudo_turn_template)
        scores = scoring.score_one_pass(self.policy, traj, pts, config.algorithm.scoring_batch_size,
                                        token_logprobs=old_source == "scoring", dedup=on)
        outcomes = pipeline.score_outcomes(traj, config.rollout.dialect, alg.format_penalty)
        advantage_NL, _ = pipeline.advantages_for(traj, outcomes, scores.mean_logp_NT, scores.valid_NT, alg, 0, 12)
        times["scoring"] = time.perf_counter() - tic

        tic = time.perf_counter()
        facts = row_facts(config, ucfg, slice(0, n), traj, advantage_NL)
        rows, _, layout, shared = update_inputs(config, ucfg, traj, scores, advantage_NL, old_source)
        selection = row_selection.select(facts, np.arange(n), n // self.micro, 0 if layout is None else layout.group_size)
        ref = jax.block_until_ready(compute_logprobs(self.reference, rows["tokens_NL"], rows["valid_NL"], self.micro,
                                                     selection=selection, **shared))
        times["ref_logp"] = time.perf_counter() - tic

        tic = time.perf_counter()
        batch = UpdateBatch(**{"old_logp_NL": None, **rows}, ref_logp_NL=ref)
        metrics = jax.block_until_ready(updater.update(batch, layout=layout, facts=facts))
        times["update"] = time.perf_counter() - tic
        losses = [float(m["loss"]) for m in metrics]
        return times, dict(losses=losses, computed=[float(m["rows_computed_frac"]) for m in metrics],
                           distinct=int((traj.first_identical_N() == np.arange(n)).sum()), layout=layout is not None)


def bench_dedup(name: str, step: DedupStep, repeats: int) -> dict:
    """The three repeat patterns, savings on and off, each once to compile and then `repeats` times
    (the fastest kept); phases summed over the patterns, losses compared pattern by pattern."""
    import numpy as np

    trajs = [with_repeats(step.traj, pattern, 4) for pattern in DEMO_DISTINCT_PER_GROUP]
    for traj in trajs:  # warm-up: every program both sides need (with a layout, one per G_u)
        for on in (True, False):
            step.run(traj, on)
    totals, infos = {}, {}
    for on in (True, False):
        runs = [[step.run(traj, on) for _ in range(repeats)] for traj in trajs]
        totals[on] = {p: sum(min(r[0][p] for r in per_traj) for per_traj in runs) for p in DEDUP_PHASES}
        infos[on] = [per_traj[0][1] for per_traj in runs]
    for (a, b) in zip(infos[True], infos[False]):
        np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-4, atol=2e-6)
    on_s, off_s = sum(totals[True].values()), sum(totals[False].values())
    distinct = [i["distinct"] for i in infos[True]]
    print(f"[dedup {name}] micro-batches of {step.micro} rows, shared prefix {infos[True][0]['layout']}; "
          f"distinct rows per step {distinct} of 16; rows computed per optimiser step "
          f"{[i['computed'] for i in infos[True]]}")
    for p in DEDUP_PHASES:
        print(f"  {p:9s} on {totals[True][p]:7.3f} s   off {totals[False][p]:7.3f} s   "
              f"off/on {totals[False][p] / max(totals[True][p], 1e-9):5.2f}")
    print(f"  losses on {[i['losses'] for i in infos[True]]}\n         off {[i['losses'] for i in infos[False]]}")
    return dict(distinct_rows=distinct, rows=16, on_s=round(on_s, 3), off_s=round(off_s, 3),
                ratio=round(off_s / on_s, 3),
                **{f"{p}_ratio": round(totals[False][p] / max(totals[True][p], 1e-9), 3) for p in DEDUP_PHASES},
                phases_on={p: round(t, 3) for p, t in totals[True].items()},
                phases_off={p: round(t, 3) for p, t in totals[False].items()},
                losses_on=[i["losses"] for i in infos[True]], losses_off=[i["losses"] for i in infos[False]])


class _Phases:
    """Wall and CPU seconds (this process, all threads) per phase of a start-up, and JAX's own
    tracing, lowering, compile-or-load and cache-read seconds inside them (jax.monitoring)."""

    JAX_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "compile_or_load",
                  "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read"}

    def __init__(self):
        import jax

        self.rows, self.jax = {}, {name: 0.0 for name in self.JAX_EVENTS.values()}
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_duration(self, event: str, duration_secs: float, **kwargs) -> None:
        if event in self.JAX_EVENTS:  # nested jits trace inside their caller: trace sums overlap a little
            self.jax[self.JAX_EVENTS[event]] += duration_secs

    def mark(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.rows[name] = dict(wall_s=round(wall - self._wall, 3), cpu_s=round(cpu - self._cpu, 3),
                               **{k: round(v, 3) for k, v in self.jax.items()})
        self._wall, self._cpu = wall, cpu
        self.jax = dict.fromkeys(self.jax, 0.0)


def startup_child(run_dir: str) -> None:
    """A fresh program's start-up: cache from the environment, model, world, two steps (demo shape, on).
    Prints the wall and CPU seconds of each phase (CPU seconds hold up better on a shared machine),
    the sub-phases of both steps, then the STARTUP line (start-up in wall and in CPU seconds)."""
    from igpo_jax import components
    from igpo_jax.runtime import compilation_cache

    compilation_cache.enable()
    compilation_cache.counts()
    phases = _Phases()
    phases.rows["imports"] = dict(wall_s=round(time.perf_counter() - _T0, 3), cpu_s=round(time.process_time(), 3))
    shape, base = SHAPES["demo"], make_config(SHAPES["demo"], True, run_dir)
    files = components.data_files(base)
    phases.mark("world")
    policy, tokenizer = components.load_policy(base)
    phases.mark("model+tokenizer")
    step = Step(shape, run_dir, policy, tokenizer)
    phases.mark("reference+initial copy")
    assert step.files == files
    first_times, first_info = step.run(True)
    phases.mark("first step")
    first_end, first_end_cpu = time.perf_counter() - _T0, time.process_time()
    tic, tic_cpu = time.perf_counter(), time.process_time()
    second_times, second_info = step.run(True)
    second, second_cpu = time.perf_counter() - tic, time.process_time() - tic_cpu
    phases.mark("second step")
    for p in PHASES:
        print(f"STEP {p:9s} first {first_times[p]:7.2f} s   second {second_times[p]:7.2f} s")
    counts = compilation_cache.counts()
    for name, row in phases.rows.items():
        print(f"PHASE {name:24s} " + " ".join(f"{k} {v:7.2f}" for k, v in row.items()))
    # the same start-up as the sum of its own phases (before the first step, then the first step's
    # tracing, lowering and compiling or loading): no step's compute in it, so none of its noise
    before_step = sum(row["wall_s"] for name, row in phases.rows.items() if name not in ("first step", "second step"))
    compiling = sum(phases.rows["first step"][k] for k in ("trace", "lower", "compile_or_load"))
    print("STARTUP", json.dumps(dict(first_end_s=first_end, second_step_s=second, startup_s=first_end - second,
                                     startup_phases_s=before_step + compiling,
                                     startup_cpu_s=first_end_cpu - second_cpu, compiled=counts.compiled,
                                     cache_hits=counts.hits, phases=phases.rows,
                                     tokens_hash=first_info["tokens_hash"], loss=first_info["loss"],
                                     same_second_step=(first_info["tokens_hash"], first_info["loss"])
                                     == (second_info["tokens_hash"], second_info["loss"]))))


def startup_pair(tmp: str) -> dict:
    """One cold start-up (fresh, empty cache directories under `tmp`), then one warm (the same)."""
    cache = os.path.join(tmp, "xla")
    out = {}
    for label in ("cold", "warm"):
        env = dict(os.environ, IGPO_JAX_COMPILATION_CACHE=cache, IGPO_JAX_WEIGHTS_CACHE=os.path.join(tmp, "weights"))
        proc = subprocess.run([sys.executable, "-m", "bench.step", "--startup-child", os.path.join(tmp, f"run_{label}")],
                              env=env, capture_output=True, text=True, timeout=1800,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
        out[label] = json.loads([x for x in proc.stdout.splitlines() if x.startswith("STARTUP ")][-1].split(" ", 1)[1])
        print(f"[startup {label}] {out[label]}")
    return out


def startup(tmp: str, pairs: int = 3) -> dict:
    """Start-up cold and warm, `pairs` times over (each pair its own fresh caches): one reading of
    each moved the ratio between 0.27 and 0.39 on this machine, so the ratio is of the medians."""
    runs = [startup_pair(os.path.join(tmp, f"startup_{i}")) for i in range(pairs)]
    median = lambda label, key: statistics.median(r[label][key] for r in runs)
    cold, warm = median("cold", "startup_s"), median("warm", "startup_s")
    cold_cpu, warm_cpu = median("cold", "startup_cpu_s"), median("warm", "startup_cpu_s")
    cold_phases, warm_phases = median("cold", "startup_phases_s"), median("warm", "startup_phases_s")
    return dict(startup_cold_s=round(cold, 3), startup_warm_s=round(warm, 3), startup_ratio=round(warm / cold, 3),
                startup_cold_cpu_s=round(cold_cpu, 3), startup_warm_cpu_s=round(warm_cpu, 3),
                startup_cpu_ratio=round(warm_cpu / cold_cpu, 3), startup_phases_cold_s=round(cold_phases, 3),
                startup_phases_warm_s=round(warm_phases, 3), startup_phases_ratio=round(warm_phases / cold_phases, 3),
                startup_pairs=pairs,
                startup_readings=[dict(cold_s=round(r["cold"]["startup_s"], 3), warm_s=round(r["warm"]["startup_s"], 3))
                                  for r in runs],
                warm_compiled=max(r["warm"]["compiled"] for r in runs),
                warm_cache_hits=min(r["warm"]["cache_hits"] for r in runs))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="demo,g16")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-startup", action="store_true")
    parser.add_argument("--startup-pairs", type=int, default=3, help="cold/warm start-up pairs (medians)")
    parser.add_argument("--startup-child", default="")
    parser.add_argument("--dedup", default="", help="identical-row savings on these shapes: demo,world")
    args = parser.parse_args()
    if args.startup_pairs < 1:
        parser.error(f"--startup-pairs must be at least 1, got {args.startup_pairs}")
    os.environ.setdefault("IGPO_PROGRESS", "0")
    if args.startup_child:
        return startup_child(args.startup_child)
    tmp = tempfile.mkdtemp(prefix="bench_step_")
    result, policy, tokenizer = {}, None, None
    for name in filter(None, args.shapes.split(",")):  # --shapes "": the start-up alone
        step = Step(SHAPES[name], os.path.join(tmp, name), policy, tokenizer)
        policy, tokenizer = step.policy, step.tokenizer
        result[name] = bench_shape(name, step, args.repeats)
    for name in filter(None, args.dedup.split(",")):
        step = DedupStep(DEDUP_SHAPES[name], os.path.join(tmp, f"dedup_{name}"), policy, tokenizer)
        policy, tokenizer = step.policy, step.tokenizer
        result[f"dedup_{name}"] = bench_dedup(name, step, args.repeats)
    if not args.no_startup:
        result.update(startup(tmp, args.startup_pairs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
