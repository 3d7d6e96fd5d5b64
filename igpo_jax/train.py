"""IGPO (or GRPO) training of a multi-turn search agent.

    python -m igpo_jax.train --config=configs/demo.py [--config.trainer.total_training_steps=8 …]

Reads top to bottom: config → mesh → data → policy and frozen reference → search back-end →
resume → loop, one function per phase of DESIGN.md's data flow: `rollout_phase` (episodes with
search) → `advantages_phase` (gold-answer scoring, rewards, advantages) → `update_phase` (π_old,
π_ref and the shared-prefix layout in `update_batch`, then the optimiser steps) → `step_metrics`
→ `finish_step` (validation, metrics record, checkpoint). Metrics of step s are converted to
floats while step s + 1 runs. With dynamic sampling (algorithm.filter_groups) `dynamic_sampling`
repeats rollout → advantages over the data's next batches until the step has its informative
groups, and the update trains on those (igpo/group_filter.py).

Multi-host (`jax.distributed`, one process per host): every process reads the same global batch
of questions and rolls out only its own questions × n rows — the rows its devices hold in the
update batch, whole groups, so that group-normalised advantages need no other process. Rollout,
search and scoring run on the process's own devices (a local copy of the policy), free-running;
then the processes agree on one padded length and assemble the global update batch, sharded over
the data axes by the mesh rules. Each row's sampling seed comes from its global index, so a run
gives the same rollouts (and, up to float rounding, the same update) on any number of processes.
Host-side metrics are combined across processes (host_metrics.py); process 0 writes the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, logging
from ml_collections import config_flags

from flax import nnx

from igpo_jax import components, config_base
from igpo_jax.data import examples as examples_lib
from igpo_jax.reporting import host_metrics, metrics as metrics_lib
from igpo_jax.runtime import compilation_cache, distributed, host_memory, sharding
from igpo_jax.training import checkpoint, row_selection
from igpo_jax.rollout.episodes import make_sampler, rollout, row_seeds
from igpo_jax.rollout.trajectories import Trajectories
from igpo_jax.igpo.evaluation import episode_record, summary
from igpo_jax.igpo import group_filter, pipeline, scoring
from igpo_jax.model import shared_prefix
from igpo_jax.reporting import progress, samples as samples_lib
from igpo_jax.reporting.next_steps import next_steps
from igpo_jax.training.update import (UpdateBatch, UpdateConfig, Updater, compute_logprobs, optimiser_steps,
                                      summarise_steps)


LENGTH_BUCKET = 128  # token rows are padded to a multiple of this, so the update compiles rarely


def loss_scale_factor(config: ml_collections.ConfigDict) -> float:
    """C of loss_agg_mode 'seq-mean-token-sum-norm': actor.loss_scale_factor, or (0) the most tokens
    the policy can generate in an episode, max_turns × max_new_tokens, a constant of the run as
    Dr. GRPO's and veRL's maximum response length is (not the batch's padded length)."""
    return float(config.actor.loss_scale_factor or config.rollout.max_turns * config.rollout.max_new_tokens)


def update_config(config: ml_collections.ConfigDict) -> UpdateConfig:
    a = config.actor
    # the schedule counts optimiser steps, several per RL step (mini-batches × epochs): built with a
    # placeholder length first, since `optimiser_steps` reads the mini-batch settings from it
    rows = config.data.train_batch_size * config.rollout.n
    ucfg = UpdateConfig(lr=a.lr, weight_decay=a.weight_decay, grad_clip=a.grad_clip, warmup_steps=a.warmup_steps,
                        schedule=a.lr_schedule, total_steps=1,
                        ppo_mini_batch_size=a.ppo_mini_batch_size, micro_batch_size=a.micro_batch_size,
                        max_tokens_per_micro_batch=a.max_tokens_per_micro_batch,
                        ppo_epochs=a.ppo_epochs, clip_ratio_low=a.clip_ratio_low, clip_ratio_high=a.clip_ratio_high,
                        clip_ratio_c=a.clip_ratio_c, use_kl_loss=a.use_kl_loss, kl_coef=a.kl_coef,
                        kl_estimator=a.kl_loss_type, entropy_coeff=a.entropy_coeff, loss_agg_mode=a.loss_agg_mode,
                        loss_scale_factor=loss_scale_factor(config))
    return dataclasses.replace(ucfg, total_steps=config.trainer.total_training_steps * optimiser_steps(ucfg, rows))


def old_logp_source(config: ml_collections.ConfigDict, ucfg: UpdateConfig, num_rows: int) -> str:
    """Where the update's π_old log-probs come from. 'none': the update takes one optimiser step,
    whose π_old is π_θ itself (ρ = 1 exactly, no forward). 'scoring': the information-gain scoring
    pass runs the policy that sampled over every loss token, so its log-probs are π_old's.
    'recompute': a forward of the policy (GRPO with several steps, or actor.recompute_old_logp)."""
    if config.actor.recompute_old_logp:
        return "recompute"
    if optimiser_steps(ucfg, num_rows) == 1:
        return "none"
    return "scoring" if config.algorithm.use_info_gain else "recompute"


def prefix_layout(config: ml_collections.ConfigDict, ucfg: UpdateConfig, traj: Trajectories, num_rows: int):
    """(split_N, layout) of the update's shared prompt prefixes (model/shared_prefix.py), or
    (None, None) when actor.share_prompt_prefix is off, when mini- or micro-batches would split a
    group, or when some process's groups share nothing. Every process agrees on the layout."""
    g = config.rollout.n
    mini = ucfg.ppo_mini_batch_size or num_rows
    if not config.actor.share_prompt_prefix or mini % g or (ucfg.micro_batch_size or mini) % g:
        return None, None
    grouped = np.array_equal(traj.group_id_N, np.repeat(traj.group_id_N[::g], g))
    split_N = shared_prefix.group_prefix_lengths(traj.tokens_NL, traj.valid_NL, traj.loss_mask_NL, g) \
        if grouped else None
    if distributed.allgather_max(int(split_N is None)):
        return None, None
    local = shared_prefix.layout_for(split_N, traj.valid_NL, g)
    return split_N, shared_prefix.PrefixLayout(g, distributed.allgather_max(local.prefix_len),
                                               distributed.allgather_max(local.suffix_len))


def algorithm_config(config: ml_collections.ConfigDict) -> pipeline.AlgorithmConfig:
    g = config.algorithm
    return pipeline.AlgorithmConfig(
        use_info_gain=g.use_info_gain, info_gain_type=g.info_gain_type, info_gain_norm_mode=g.info_gain_norm_mode,
        norm_adv_by_std_in_grpo=g.norm_adv_by_std_in_grpo, gamma=g.gamma, use_curriculum=g.use_curriculum,
        curriculum_f1_init=g.curriculum_f1_init, curriculum_f1_final=g.curriculum_f1_final,
        curriculum_ig_init=g.curriculum_ig_init, curriculum_ig_final=g.curriculum_ig_final,
        format_penalty=g.format_penalty, use_outcome_reward=g.use_outcome_reward,
        shuffle_info_gain=g.shuffle_info_gain, shuffle_seed=int(config.seed),
        info_gain_norm_scope=g.info_gain_norm_scope, info_gain_std_floor=float(g.info_gain_std_floor))


def end_phase(timings: dict[str, float], name: str, tic: float, peaks: dict[str, float],
              compiled: float | None = None) -> None:
    """Adds the phase's seconds since `tic` to its time this step (a step with dynamic sampling runs
    rollout and scoring once per round), and with `compiled` (compilation_cache.counts().seconds at
    `tic`) its seconds spent compiling to timings[name + "_compile"]; records the process's peak memory so far (monotone:
    the first phase whose figure reaches a run's peak is the one that set it), then hands the
    buffers it freed back to the OS (kept by malloc, they would add up to the peak of the next phase)."""
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - tic
    if compiled is not None:
        key = f"{name}_compile"
        timings[key] = timings.get(key, 0.0) + compilation_cache.counts().seconds - compiled
    peaks[name] = host_memory.peak_rss_gib()
    host_memory.release()


def padded_length(length: int, bucket: int = LENGTH_BUCKET) -> int:
    """`length` rounded up to a multiple of `bucket`."""
    return length + (-length) % bucket


def update_rows(traj: Trajectories, advantage_NL: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """This process's rows of the update batch, right-padded to `length` tokens (agreed on by all
    processes, so that their rows stack into one global array)."""
    grow = lambda x: np.pad(x, ((0, 0), (0, length - x.shape[1])))
    return {"tokens_NL": grow(traj.tokens_NL), "valid_NL": grow(traj.valid_NL),
            "loss_mask_NL": grow(traj.loss_mask_NL.astype(np.float32)),
            "advantage_NL": grow(advantage_NL.astype(np.float32))}


def rollout_seed(config, step: int) -> int:
    return int(config.seed) * 1_000_003 + step


def own_rows(mesh, rules, num_rows: int, group_size: int) -> slice:
    """The rows of the global update batch that this process's devices hold, which it therefore
    rolls out itself; whole groups, so that advantages are normalised within one process."""
    spec = sharding.logical_to_spec(("batch", "length"), rules, mesh, (num_rows, LENGTH_BUCKET))
    rows = distributed.process_rows(mesh, spec, (num_rows, LENGTH_BUCKET))
    if jax.process_count() > 1 and rows.stop - rows.start == num_rows:
        raise ValueError(f"the update batch of {num_rows} rows is not split across the {jax.process_count()} "
                         f"processes (batch sharding {spec}): make train_batch_size × rollout.n a multiple of the "
                         f"devices on the batch axes of mesh {dict(mesh.shape)}")
    if rows.start % group_size or rows.stop % group_size:
        raise ValueError(f"process {jax.process_index()} holds rows {rows.start}..{rows.stop - 1} of the update "
                         f"batch, which split the groups of rollout.n={group_size}; make the rows per process a "
                         f"multiple of rollout.n")
    return rows


def process_local_policy(policy, mesh, local_mesh, view=None):
    """The policy on this process's devices only, for rollout and scoring (which run per process,
    outside the lockstep of the update); the policy itself when the run has one process. Pass the
    previous `view` to refresh it in place (the sampler holds on to it)."""
    if local_mesh is mesh:
        return policy
    graphdef, state = nnx.split(policy)
    local_state = distributed.process_local_copy(state, mesh, local_mesh)
    if view is None:
        return nnx.merge(graphdef, local_state)
    nnx.update(view, local_state)
    return view


def validate(config, model, tokenizer, search, examples, dialect_penalty, show: bool = False,
             step: int | None = None) -> dict[str, float]:
    """Greedy episodes over the test questions (each process its share, with its local `model`);
    F1/EM/no-format F1 per data source over all of them. `show`: a progress bar over the episodes.
    With `step`, process 0 writes its episodes (answer, gold, format, finish reason, response) to
    RUN_DIR/samples/val_step_NNNNNN.jsonl: what a format error or a wrong answer looked like.
    Also returns its seconds, and of those the seconds spent compiling (time/validation_*)."""
    tic, compiled = time.perf_counter(), compilation_cache.counts().seconds
    rcfg = components.rollout_config(config, validation=True)
    mine = examples[distributed.process_share(len(examples))]
    records = []
    if mine:
        batch = min(config.data.val_batch_size, len(mine))
        sampler = make_sampler(model, tokenizer, rcfg, batch)
        with progress.bar(len(mine), "validation", show, unit="ep") as bar:
            on_progress = progress.rollout_callback(bar)
            for chunk in examples_lib.evaluation_batches(mine, batch):
                traj, _ = rollout(chunk, 1, sampler, tokenizer, search, rcfg, seed=0, on_progress=on_progress)
                records += [episode_record(ep, rcfg.dialect, dialect_penalty, int(t))
                            for ep, t in zip(traj.episodes, traj.num_turns_N)]
    if step is not None and jax.process_index() == 0:  # its own share, with the texts
        samples_lib.write_jsonl_at(samples_lib.validation_samples_path(config.run_dir, step), records)
    if jax.process_count() > 1:  # the summary needs only the numbers; leave the texts behind
        slim = [{k: v for k, v in r.items() if k not in ("response", "golden_answers", "answer")} for r in records]
        records = [r for part in distributed.allgather_json(slim) for r in part]
    table = summary(records)
    out = {f"val/{m}": table["all"][m] for m in ("f1", "em", "no_format_f1", "turns", "searches")}
    out.update({f"val/{source}/f1": row["f1"] for source, row in table.items() if source not in ("all", "macro")})
    out["val/format_error"] = float(np.mean([not r["format_ok"] for r in records]))
    for m in ("f1", "no_format_f1"):  # standard error of the mean over questions: is a change noise?
        values = np.asarray([float(r[m]) for r in records])
        out[f"val/{m}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    out["val/questions"] = float(len(records))
    # the fullest process's peak so far, in whole MiB rounded up (allgather_max takes integers)
    peak_mib = distributed.allgather_max(math.ceil(host_memory.peak_rss_gib() * 1024))
    out["memory/peak_rss_after_validation_gib"] = peak_mib / 1024
    out["time/validation_s"] = time.perf_counter() - tic
    out["time/validation_compile_s"] = compilation_cache.counts().seconds - compiled
    return out


def samples_due(config, done: int, last: bool = False) -> bool:
    """Whether step `done` writes rollout samples: every trainer.sample_freq steps, and on the
    steps that validate (every test_freq, and the last)."""
    t = config.trainer
    return bool((t.sample_freq and done % t.sample_freq == 0)
                or (t.test_freq and (done % t.test_freq == 0 or last or done == t.total_training_steps)))


def budget_spent(config, batches) -> bool:
    """Whether trainer.rollout_budget is reached: every question drawn from the data was rolled
    out rollout.n times (dynamic sampling draws a batch a round, so its extra rounds count)."""
    budget = config.trainer.rollout_budget
    return bool(budget) and batches.questions_drawn * config.rollout.n >= budget


def write_rollout_samples(config, actor, tokenizer, traj, examples, scores, advantage_NL, done: int) -> str:
    """RUN_DIR/samples/step_NNNNNN.jsonl for this process's rollouts of step `done` (process 0's
    share in a multi-host run). A GRPO run never scores P(gold); it does so here, on these
    steps only (one forward over the rows), so its samples show how P(gold) moved too."""
    if scores is None:
        pts = scoring.pseudo_turns(tokenizer, [pipeline.ANSWER_SPLIT.join(ep.golden_answers) for ep in traj.episodes],
                                   config.algorithm.pseudo_turn_template)
        scores = scoring.score_one_pass(actor, traj, pts, config.algorithm.scoring_batch_size)
    records = samples_lib.episode_samples(
        traj, examples, tokenizer, components.rollout_config(config), format_penalty=config.algorithm.format_penalty,
        mean_logp_NT=scores.mean_logp_NT, valid_NT=scores.valid_NT, info_gain_type=config.algorithm.info_gain_type,
        advantage_NL=advantage_NL, step=done)
    return samples_lib.write_samples(config.run_dir, done, records)


def global_host_metrics(local: dict[str, float], rows: int, generated_tokens: int) -> dict[str, float]:
    """This process's host-side metrics combined with every other process's (identity for one)."""
    if jax.process_count() == 1:
        return local
    gathered = distributed.allgather_json({"metrics": local, "rows": rows, "tokens": generated_tokens})
    return host_metrics.combine([g["metrics"] for g in gathered], [g["rows"] for g in gathered],
                                [g["tokens"] for g in gathered])


@dataclasses.dataclass
class Run:
    """What every step of a run works with, built once by `train`. `actor` (scores turns) and
    `sampling_model` (generates) are this process's views of the policy, refreshed after each
    update."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    local_mesh: jax.sharding.Mesh  # rollout and scoring: this process's devices
    rules: sharding.Rules
    rows: slice  # this process's rows of the global update batch
    num_rows: int  # rows of the global update batch: train_batch_size × rollout.n
    policy: nnx.Module
    reference: nnx.Module | None  # π_ref, frozen; None without the KL loss
    tokenizer: object
    ucfg: UpdateConfig
    alg: pipeline.AlgorithmConfig
    old_source: str  # where π_old's log-probs come from (old_logp_source)
    updater: Updater
    rcfg: object  # the rollout's config
    sampler: object
    search: object
    show: bool  # progress bars
    actor: nnx.Module
    sampling_model: nnx.Module


@contextlib.contextmanager
def phase(name: str, timings: dict[str, float], peaks: dict[str, float], steps_bar) -> Iterator[None]:
    """One phase of a step: named on the steps bar while it runs, timed (its compile seconds too) and
    memory-traced (end_phase)."""
    steps_bar.set_postfix_str(name)
    tic, compiled = time.perf_counter(), compilation_cache.counts().seconds
    yield
    end_phase(timings, name, tic, peaks, compiled)


def rollout_phase(run: Run, examples, step: int, round_index: int = 0) -> tuple[Trajectories, dict[str, float]]:
    """Rollout: this process's questions × rollout.n episodes, sampled by its local policy, with
    search; each row's seed comes from its global index (and the generation round of the step:
    dynamic sampling's extra rounds sample with seeds of their own)."""
    seeds = row_seeds(rollout_seed(run.config, step), run.num_rows, round_index)[run.rows]
    label = f"step {step + 1} rollout" + (f" (round {round_index + 1})" if round_index else "")
    with sharding.activate(run.local_mesh, run.rules), \
            progress.bar(run.rows.stop - run.rows.start, label, run.show, unit="ep") as bar:
        traj, rollout_stats = rollout(examples, run.config.rollout.n, run.sampler, run.tokenizer, run.search,
                                      run.rcfg, seeds=seeds, on_progress=progress.rollout_callback(bar))
    run.sampler.free_cache()  # its KV cache is not needed again until the next rollout
    return traj, rollout_stats


def advantages_phase(run: Run, traj: Trajectories, step: int):
    """Gold-answer scoring (IGPO only) → rewards → advantages. Returns (scores or None,
    advantage_NL, reward metrics); with old_source 'scoring' the scores carry π_old's log-probs."""
    scores = None
    if run.alg.use_info_gain:
        pts = scoring.pseudo_turns(run.tokenizer, [pipeline.ANSWER_SPLIT.join(ep.golden_answers)
                                                   for ep in traj.episodes],
                                   run.config.algorithm.pseudo_turn_template)
        with sharding.activate(run.local_mesh, run.rules), \
                progress.bar(traj.num_rollouts, f"step {step + 1} scoring", run.show, unit="ep") as bar:
            # the scoring model is the policy the update starts from: π_old from its pass
            scores = scoring.score_one_pass(run.actor, traj, pts, run.config.algorithm.scoring_batch_size,
                                            token_logprobs=run.old_source == "scoring", on_batch=bar.update,
                                            dedup=run.config.actor.dedup_rows,
                                            share_prompt=run.config.actor.share_prompt_prefix)
    outcomes = pipeline.score_outcomes(traj, run.rcfg.dialect, run.alg.format_penalty)
    advantage_NL, reward_metrics = pipeline.advantages_for(
        traj, outcomes, None if scores is None else scores.mean_logp_NT,
        None if scores is None else scores.valid_NT, run.alg, step, run.config.trainer.total_training_steps)
    return scores, advantage_NL, reward_metrics


def row_facts(config, ucfg: UpdateConfig, rows: slice, traj: Trajectories,
              advantage_NL: np.ndarray) -> row_selection.RowFacts:
    """The global update batch's rows as the update's passes select them (row_selection.py):
    identical rows of a group (same conversation and advantages) once, with actor.dedup_rows;
    rows that carry no gradient (zero advantages, no KL or entropy term) not at all, with
    actor.skip_rows_without_gradient. Every process's rows (this one's: `rows` of the update
    batch), in global indices."""
    actor, n = config.actor, traj.num_rollouts
    first = traj.first_identical_N(advantage_NL) if actor.dedup_rows else np.arange(n)
    kl_or_entropy = (ucfg.use_kl_loss and ucfg.kl_coef != 0) or ucfg.entropy_coeff != 0
    active = (row_selection.rows_with_gradient(advantage_NL, traj.loss_mask_NL, kl_or_entropy)
              if actor.skip_rows_without_gradient else np.ones(n, bool))
    local = dict(first=(first + rows.start).tolist(), active=active.tolist(),
                 tokens=np.asarray(traj.loss_mask_NL).sum(1).tolist())
    parts = distributed.allgather_json(local)  # in process order: the global rows' order
    join = lambda key, dtype: np.asarray([v for part in parts for v in part[key]], dtype)
    return row_selection.RowFacts(join("first", np.int64), join("active", bool), join("tokens", np.int64))


def informative_groups(run: Run, traj: Trajectories, advantage_NL: np.ndarray) -> np.ndarray:
    """[groups] bool: which of this round's groups carry a signal by algorithm.filter_groups.metric."""
    metric = run.config.algorithm.filter_groups.metric
    outcomes = None if metric == "advantage" else pipeline.score_outcomes(traj, run.rcfg.dialect,
                                                                          run.alg.format_penalty)
    return group_filter.informative_groups(metric, run.config.rollout.n, advantage_NL, traj.loss_mask_NL,
                                           reward_N=None if outcomes is None else outcomes.reward_N,
                                           em_N=None if outcomes is None else outcomes.em_N)


def rounds_metrics(per_round: list[dict[str, float]], rows: list[int], tokens: list[int]) -> dict[str, float]:
    """A step's host-side rollout and reward metrics from its generation rounds, combined as the
    processes' are (host_metrics: means weighted by rows, pooled stds, summed counts), except that
    seconds add up: the rounds ran one after another, not side by side."""
    out = host_metrics.combine(per_round, rows, tokens)
    for key in out:
        if host_metrics.rule_for(key) == host_metrics.MAX:
            out[key] = sum(m.get(key, 0.0) for m in per_round)
    return out


def dynamic_sampling(run: Run, batches, questions: slice, step: int, timings: dict[str, float],
                     peaks: dict[str, float], steps_bar):
    """algorithm.filter_groups: rollout → advantages over the data's next batches, round after round,
    until this process's share of the update batch is informative groups (igpo/group_filter.py) or
    the rounds reach their cap, when dropped groups fill the rest. Returns (the update batch's
    groups, the rollout and reward metrics of every group rolled out with filter_groups/*, and
    (rows, generated tokens) of every round).

    Multi-host: each process fills its own share (its groups stay on its devices, as without
    filtering), so the selection depends on the number of processes. Every process reads every
    round's batch, whether it still needs groups or not, and the processes decide together whether
    another round runs: the data iterators stay in step, so the position a checkpoint saves after
    the step is every process's, and a resumed run reads the same batches."""
    fg = run.config.algorithm.filter_groups
    selection = group_filter.Selection(questions.stop - questions.start)
    cap = group_filter.round_cap(fg.max_num_gen_batches, batches.batches_per_epoch)
    per_round, rows, tokens = [], [], []
    rounds = 0
    while True:
        examples = next(batches)[questions]
        if selection.missing:  # a process whose share is full only keeps its iterator in step
            with phase("rollout", timings, peaks, steps_bar):
                traj, rollout_stats = rollout_phase(run, examples, step, round_index=rounds)
            with phase("scoring", timings, peaks, steps_bar):
                scores, advantage_NL, reward_metrics = advantages_phase(run, traj, step)
            selection.add(group_filter.Groups(tuple(examples), traj, scores, advantage_NL),
                          informative_groups(run, traj, advantage_NL))
            per_round.append({**rollout_stats, **reward_metrics})
            rows.append(traj.num_rollouts)
            tokens.append(int(traj.loss_mask_NL.sum()))
        rounds += 1
        if not distributed.allgather_max(selection.missing) or rounds >= cap:
            break
    metrics = rounds_metrics(per_round, rows, tokens)
    metrics.update(selection.metrics(rounds, cap_hit=selection.missing > 0))
    return selection.batch(), metrics, (sum(rows), sum(tokens))


def update_batch(run: Run, traj: Trajectories, scores, advantage_NL: np.ndarray, facts: row_selection.RowFacts):
    """(the global UpdateBatch, its shared-prefix layout or None): every process's rows padded to
    one length, π_old's log-probs (from scoring, recomputed, or none: π_θ itself) and π_ref's
    (each distinct row computed once, as `facts` say)."""
    length = padded_length(distributed.allgather_max(traj.tokens_NL.shape[1]))
    host_rows = update_rows(traj, advantage_NL, length)
    if run.old_source == "scoring":
        host_rows["old_logp_NL"] = np.pad(scores.token_logp_NL, ((0, 0), (0, length - traj.tokens_NL.shape[1])))
    spec = sharding.logical_to_spec(("batch", "length"), run.rules, run.mesh, (run.num_rows, length))
    global_rows = distributed.host_local_batch_to_global(host_rows, run.mesh, spec)
    micro = run.ucfg.micro_batch_size
    tokens_NL = global_rows["tokens_NL"]
    # each group's prompt computed once for its G rows, in every forward and backward below
    split_N, layout = prefix_layout(run.config, run.ucfg, traj, run.num_rows)
    shared = {}
    if layout is not None:
        global_rows["prefix_len_N"] = distributed.host_local_batch_to_global(
            split_N, run.mesh, jax.sharding.PartitionSpec(spec[0]))
        shared = dict(prefix_len_N=global_rows["prefix_len_N"], layout=layout,
                      needed_NL=global_rows["loss_mask_NL"] > 0)
    micro_count = run.num_rows // (micro or run.num_rows)
    shared["selection"] = row_selection.select(facts, np.arange(run.num_rows), micro_count,
                                               0 if layout is None else layout.group_size)
    if run.old_source == "recompute":
        global_rows["old_logp_NL"] = compute_logprobs(run.policy, tokens_NL, global_rows["valid_NL"], micro,
                                                      **shared)
    ref_logp = compute_logprobs(run.reference, tokens_NL, global_rows["valid_NL"], micro, **shared) \
        if run.reference is not None else jnp.zeros(tokens_NL.shape, jnp.float32, device=tokens_NL.sharding)
    return UpdateBatch(**{"old_logp_NL": None, **global_rows}, ref_logp_NL=ref_logp), layout


def update_phase(run: Run, traj: Trajectories, scores, advantage_NL: np.ndarray, step: int) -> list[dict]:
    """Update: the optimiser steps of the clipped loss (+ KL) over the global batch; then this
    process's views of the new policy. Returns each optimiser step's metrics."""
    facts = row_facts(run.config, run.ucfg, run.rows, traj, advantage_NL)
    batch, layout = update_batch(run, traj, scores, advantage_NL, facts)
    with progress.bar(optimiser_steps(run.ucfg, run.num_rows), f"step {step + 1} update", run.show,
                      unit="opt step") as bar:
        update_metrics = run.updater.update(batch, on_step=(lambda: bar.update(1)) if run.show else None,
                                            layout=layout, facts=facts)
    jax.block_until_ready(update_metrics)  # the phase's time is its compute, not its dispatch
    # the update donated the old params, which a local view shares buffers with
    run.actor = process_local_policy(run.policy, run.mesh, run.local_mesh, run.actor)
    run.sampling_model = components.in_dtype(run.actor, run.config.rollout.dtype, run.sampling_model)
    return update_metrics


def step_metrics(run: Run, traj: Trajectories, rollout_stats, reward_metrics, update_metrics,
                 timings: dict[str, float], peaks: dict[str, float],
                 generation: tuple[int, int] | None = None) -> dict[str, float]:
    """The step's metrics: host-side ones combined across processes, then the update's (global).
    `traj`: the update's rows. `generation`: (rollouts, generated tokens) of the step's rollouts
    where they are more than the update's (dynamic sampling's rounds)."""
    rolled_out, generated = generation or (traj.num_rollouts, int(traj.loss_mask_NL.sum()))
    host_side = {}
    host_side.update(rollout_stats)
    host_side.update(reward_metrics)
    host_side.update({f"search/{k}": v for k, v in run.search.stats.as_metrics(prefix="").items()})
    host_side.update({f"time/{k}_s": v for k, v in timings.items()})
    host_side.update({f"memory/peak_rss_after_{k}_gib": v for k, v in peaks.items()})
    host_side["time/rollout_tok_s"] = generated / max(timings["rollout"], 1e-9)
    host_side["time/update_tok_s"] = (float(traj.valid_NL.sum()) * run.ucfg.ppo_epochs
                                      / max(timings["update"], 1e-9))
    host_side["response_length/mean"] = generated / rolled_out
    out = {}
    out.update(global_host_metrics(host_side, rolled_out, generated))
    # every optimiser step of the update, not only the last (global already)
    out.update({f"actor/{k}": v for k, v in summarise_steps(update_metrics).items()})
    return out


def finish_step(run: Run, done: int, metrics: dict[str, float], val_examples, writer, ckpt, batches,
                steps_bar, compiled_at_start: float, last: bool = False) -> list:
    """Validation when due, the step's metrics record, and a checkpoint when due; returns the
    records written. `compiled_at_start`: compilation_cache.counts().seconds when the step began,
    for time/compile_s (the step's seconds spent compiling, validation included: on a cold cache
    the first steps of a run are mostly that). `last`: the run ends here (total_training_steps or
    trainer.rollout_budget): validated and checkpointed whatever the frequencies say."""
    t = run.config.trainer
    last = last or done == t.total_training_steps
    if t.test_freq and (done % t.test_freq == 0 or last) and val_examples:
        steps_bar.set_postfix_str("validation")
        with sharding.activate(run.local_mesh, run.rules):
            metrics.update(validate(run.config, run.sampling_model, run.tokenizer, run.search, val_examples,
                                    run.alg.format_penalty, show=run.show, step=done))
    metrics["time/compile_s"] = compilation_cache.counts().seconds - compiled_at_start
    written = [writer.write(done, metrics)]  # prints the step's console line now
    steps_bar.update(1)
    if t.save_freq and (done % t.save_freq == 0 or last):
        # metrics up to the checkpoint reach disk first: a run killed after this save
        # resumes at done + 1 and would otherwise never write this step's record
        written.append(writer.flush())
        ckpt.save(done, run.policy, run.updater, batches)
    return written


def train(config: ml_collections.ConfigDict) -> list[dict[str, float]]:
    """Runs (or resumes) the configured training; returns the per-step metrics written."""
    config_base.validate(config)
    os.makedirs(config.run_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(config.run_dir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    mesh, rules = components.mesh_and_rules(config)
    local_mesh = distributed.process_local_mesh(mesh)  # rollout and scoring: this process's devices
    group_size = config.rollout.n
    num_rows = config.data.train_batch_size * group_size
    rows = own_rows(mesh, rules, num_rows, group_size)
    questions = slice(rows.start // group_size, rows.stop // group_size)
    files = components.data_files(config)
    train_examples = components.load_examples(files.train)
    val_examples = components.load_examples(files.test, config.data.val_max_questions)
    # every process iterates the same global batches and takes its own questions from each
    batches = examples_lib.BatchIterator(train_examples, config.data.train_batch_size, seed=config.seed,
                                         shuffle=config.data.shuffle)

    with sharding.activate(mesh, rules):
        policy, tokenizer = components.load_policy(config, mesh, rules)
        reference = components.frozen_copy(policy) if config.actor.use_kl_loss else None  # before any restore
        ucfg, alg = update_config(config), algorithm_config(config)
        updater = Updater(policy, ucfg)
        ckpt = checkpoint.RunCheckpointer(os.path.join(config.run_dir, checkpoint.CHECKPOINTS_SUBDIR),
                                          config.trainer.max_checkpoints)
        start_step = ckpt.restore_latest(policy, updater, batches)
        if start_step:
            logging.info("resumed from step %d", start_step)
        # the steps after the checkpoint run again: their earlier records go (a fresh run: all of
        # them, step 0's validation included), so that each step is recorded once
        writer = metrics_lib.MetricsWriter(config.run_dir, use_tensorboard=config.trainer.use_tensorboard,
                                           use_wandb=config.trainer.use_wandb, print_fn=progress.console_print,
                                           first_step=start_step + 1 if start_step else 0)
        show = progress.enabled(config.trainer.progress, jax.process_index() == 0)
        rcfg = components.rollout_config(config)
        actor = process_local_policy(policy, mesh, local_mesh)  # scores turns
        sampling_model = components.in_dtype(actor, config.rollout.dtype)  # generates
        sampler = make_sampler(sampling_model, tokenizer, rcfg, rows.stop - rows.start, mesh=local_mesh,
                               rules=rules)
        total = config.trainer.total_training_steps
        history = []
        with components.search_backend(config, files.corpus) as search:
            run = Run(config, mesh, local_mesh, rules, rows, num_rows, policy, reference, tokenizer, ucfg, alg,
                      old_logp_source(config, ucfg, num_rows), updater, rcfg, sampler, search, show, actor,
                      sampling_model)
            if config.trainer.val_before_train and start_step == 0 and val_examples:
                # step 0: the policy before any update (the reference's val_before_train)
                with sharding.activate(local_mesh, rules):
                    history.append(writer.write(0, validate(config, sampling_model, tokenizer, search, val_examples,
                                                            alg.format_penalty, step=0)))
            steps_bar = progress.bar(total, "train", show, unit="step", leave=True, initial=start_step)
            # a run resumed after its budget's last step has nothing left to do
            for step in range(start_step, start_step if budget_spent(config, batches) else total):
                timings, peaks, generation = {}, {}, None
                compiled_at_start = compilation_cache.counts().seconds
                if config.algorithm.filter_groups.enable:
                    groups, reward_metrics, generation = dynamic_sampling(run, batches, questions, step, timings,
                                                                          peaks, steps_bar)
                    examples, traj, scores, advantage_NL = (groups.examples, groups.traj, groups.scores,
                                                            groups.advantage_NL)
                    rollout_stats = {}  # in reward_metrics: combined over the rounds
                else:
                    with phase("rollout", timings, peaks, steps_bar):
                        examples = next(batches)[questions]
                        traj, rollout_stats = rollout_phase(run, examples, step)
                    with phase("scoring", timings, peaks, steps_bar):
                        scores, advantage_NL, reward_metrics = advantages_phase(run, traj, step)
                last = budget_spent(config, batches)  # the questions of this step's rounds are drawn
                # with dynamic sampling: the groups the update trains on (their rollouts, scores, advantages)
                if samples_due(config, step + 1, last) and jax.process_index() == 0:
                    with sharding.activate(local_mesh, rules):
                        write_rollout_samples(config, run.actor, tokenizer, traj, examples, scores, advantage_NL,
                                              step + 1)
                with phase("update", timings, peaks, steps_bar):
                    update_metrics = update_phase(run, traj, scores, advantage_NL, step)
                metrics = step_metrics(run, traj, rollout_stats, reward_metrics, update_metrics, timings, peaks,
                                       generation)
                # the run's rollouts so far (all processes'): arms compared at equal generation
                metrics["trainer/generated_rollouts"] = float(batches.questions_drawn * config.rollout.n)
                history += finish_step(run, step + 1, metrics, val_examples, writer, ckpt, batches, steps_bar,
                                       compiled_at_start, last)
                if last:
                    logging.info("trainer.rollout_budget=%d reached at step %d", config.trainer.rollout_budget,
                                 step + 1)
                    break
            steps_bar.close()
        history.append(writer.close())
        ckpt.close()
    return [h for h in history if h]


def main(argv):
    del argv
    components.start_program()
    progress.line_buffered_stdout()  # a log file (nohup, `> log`) gets each step's line when it ends
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/<experiment>.py is required")
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    train(_CONFIG.value)
    if jax.process_index() == 0:
        print(next_steps(_CONFIG.value))


def _define_flags():
    """Flags exist only when this module runs as a program, so that importing it (tests, other
    entry points) defines none."""
    global _CONFIG
    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
