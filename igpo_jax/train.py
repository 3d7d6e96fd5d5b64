"""IGPO (or GRPO) training of a multi-turn search agent.

    python -m igpo_jax.train --config=configs/demo.py [--config.trainer.total_training_steps=8 …]

Reads top to bottom: config → mesh → data → policy and frozen reference → search back-end →
resume → loop (rollout → gold-answer scoring → rewards/advantages → update → metrics,
validation, checkpoint). Metrics of step s are converted to floats while step s + 1 runs.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from igpo_jax import checkpoint, components, distributed, config_base, data, metrics as metrics_lib, sharding
from igpo_jax.agent.rollout import make_sampler, rollout
from igpo_jax.agent.trajectories import Trajectories
from igpo_jax.evaluation import episode_record, summary
from igpo_jax.igpo import pipeline, scoring
from igpo_jax.update import UpdateBatch, UpdateConfig, Updater, compute_logprobs


LENGTH_BUCKET = 128  # token rows are padded to a multiple of this, so the update compiles rarely


def update_config(config: ml_collections.ConfigDict) -> UpdateConfig:
    a = config.actor
    return UpdateConfig(lr=a.lr, weight_decay=a.weight_decay, grad_clip=a.grad_clip, warmup_steps=a.warmup_steps,
                        ppo_mini_batch_size=a.ppo_mini_batch_size, micro_batch_size=a.micro_batch_size,
                        ppo_epochs=a.ppo_epochs, clip_ratio_low=a.clip_ratio_low, clip_ratio_high=a.clip_ratio_high,
                        clip_ratio_c=a.clip_ratio_c, use_kl_loss=a.use_kl_loss, kl_coef=a.kl_coef,
                        kl_estimator=a.kl_loss_type, entropy_coeff=a.entropy_coeff, loss_agg_mode=a.loss_agg_mode)


def algorithm_config(config: ml_collections.ConfigDict) -> pipeline.AlgorithmConfig:
    g = config.algorithm
    return pipeline.AlgorithmConfig(
        use_info_gain=g.use_info_gain, info_gain_type=g.info_gain_type, info_gain_norm_mode=g.info_gain_norm_mode,
        norm_adv_by_std_in_grpo=g.norm_adv_by_std_in_grpo, gamma=g.gamma, use_curriculum=g.use_curriculum,
        curriculum_f1_init=g.curriculum_f1_init, curriculum_f1_final=g.curriculum_f1_final,
        curriculum_ig_init=g.curriculum_ig_init, curriculum_ig_final=g.curriculum_ig_final,
        format_penalty=g.format_penalty)


def padded_rows(traj: Trajectories, bucket: int = LENGTH_BUCKET):
    """Token-row arrays padded on the right to a multiple of `bucket`."""
    n, length = traj.tokens_NL.shape
    pad = (-length) % bucket
    grow = lambda x: np.pad(x, ((0, 0), (0, pad)))
    return grow(traj.tokens_NL), grow(traj.valid_NL), grow(traj.loss_mask_NL.astype(np.float32))


def rollout_seed(config, step: int) -> int:
    return int(config.seed) * 1_000_003 + step


def validate(config, model, tokenizer, search, examples, dialect_penalty) -> dict[str, float]:
    """Greedy episodes over the test questions; F1/EM/no-format F1 per data source."""
    rcfg = components.rollout_config(config, validation=True)
    batch = min(config.data.val_batch_size, len(examples))
    sampler = make_sampler(model, tokenizer, rcfg, batch)
    records = []
    for chunk in data.evaluation_batches(examples, batch):
        traj, _ = rollout(chunk, 1, sampler, tokenizer, search, rcfg, seed=0)
        records += [episode_record(ep, rcfg.dialect, dialect_penalty, int(t))
                    for ep, t in zip(traj.episodes, traj.num_turns_N)]
    table = summary(records)
    out = {f"val/{m}": table["all"][m] for m in ("f1", "em", "no_format_f1", "turns", "searches")}
    out.update({f"val/{source}/f1": row["f1"] for source, row in table.items() if source not in ("all", "macro")})
    return out


def train(config: ml_collections.ConfigDict) -> list[dict[str, float]]:
    """Runs (or resumes) the configured training; returns the per-step metrics written."""
    config_base.validate(config)
    os.makedirs(config.run_dir, exist_ok=True)
    with open(os.path.join(config.run_dir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    mesh, rules = components.mesh_and_rules(config)
    files = components.data_files(config)
    train_examples = components.load_examples(files.train)
    val_examples = components.load_examples(files.test, config.data.val_max_questions)
    batches = data.BatchIterator(train_examples, config.data.train_batch_size, seed=config.seed,
                                 shuffle=config.data.shuffle)

    with sharding.activate(mesh, rules):
        policy, tokenizer = components.load_policy(config, mesh, rules)
        reference = components.load_policy(config, mesh, rules)[0] if config.actor.use_kl_loss else None
        ucfg, alg = update_config(config), algorithm_config(config)
        updater = Updater(policy, ucfg)
        ckpt = checkpoint.RunCheckpointer(os.path.join(config.run_dir, checkpoint.CHECKPOINTS_SUBDIR),
                                          config.trainer.max_checkpoints)
        start_step = ckpt.restore_latest(policy, updater, batches)
        if start_step:
            logging.info("resumed from step %d", start_step)
        writer = metrics_lib.MetricsWriter(config.run_dir, use_tensorboard=config.trainer.use_tensorboard,
                                           use_wandb=config.trainer.use_wandb)
        rcfg = components.rollout_config(config)
        sampler = make_sampler(policy, tokenizer, rcfg, config.data.train_batch_size * config.rollout.n,
                               mesh=mesh, rules=rules)
        total = config.trainer.total_training_steps
        history = []
        with components.search_backend(config, files.corpus) as search:
            for step in range(start_step, total):
                timings, step_metrics = {}, {}
                tic = time.perf_counter()
                examples = next(batches)
                traj, rollout_stats = rollout(examples, config.rollout.n, sampler, tokenizer, search, rcfg,
                                              seed=rollout_seed(config, step))
                timings["rollout"] = time.perf_counter() - tic

                tic = time.perf_counter()
                scores = None
                if alg.use_info_gain:
                    pts = scoring.pseudo_turns(tokenizer, [pipeline.ANSWER_SPLIT.join(ep.golden_answers)
                                                           for ep in traj.episodes],
                                               config.algorithm.pseudo_turn_template)
                    scores = scoring.score_one_pass(policy, traj, pts, config.algorithm.scoring_batch_size)
                outcomes = pipeline.score_outcomes(traj, rcfg.dialect, alg.format_penalty)
                advantage_NL, reward_metrics = pipeline.advantages_for(
                    traj, outcomes, None if scores is None else scores.mean_logp_NT,
                    None if scores is None else scores.valid_NT, alg, step, total)
                timings["scoring"] = time.perf_counter() - tic

                tic = time.perf_counter()
                tokens, valid, loss_mask = padded_rows(traj)
                advantage = np.pad(advantage_NL, ((0, 0), (0, tokens.shape[1] - advantage_NL.shape[1])))
                micro = ucfg.micro_batch_size
                old_logp = compute_logprobs(policy, tokens, valid, micro)
                ref_logp = compute_logprobs(reference, tokens, valid, micro) if reference is not None \
                    else np.zeros_like(old_logp)
                batch = UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(loss_mask),
                                    jnp.asarray(advantage), jnp.asarray(old_logp), jnp.asarray(ref_logp))
                update_metrics = updater.update(batch)
                timings["update"] = time.perf_counter() - tic

                generated = float(traj.loss_mask_NL.sum())
                step_metrics.update(rollout_stats)
                step_metrics.update(reward_metrics)
                step_metrics.update({f"actor/{k}": v for k, v in update_metrics[-1].items()})
                step_metrics.update({f"search/{k}": v for k, v in search.stats.as_metrics(prefix="").items()})
                step_metrics.update({f"time/{k}_s": v for k, v in timings.items()})
                step_metrics["time/rollout_tok_s"] = generated / max(timings["rollout"], 1e-9)
                step_metrics["time/update_tok_s"] = float(valid.sum()) * ucfg.ppo_epochs / max(timings["update"], 1e-9)
                step_metrics["response_length/mean"] = generated / traj.num_rollouts

                done = step + 1
                if config.trainer.test_freq and (done % config.trainer.test_freq == 0 or done == total) and val_examples:
                    step_metrics.update(validate(config, policy, tokenizer, search, val_examples,
                                                 alg.format_penalty))
                history.append(writer.write(done, step_metrics))
                if config.trainer.save_freq and (done % config.trainer.save_freq == 0 or done == total):
                    # metrics up to the checkpoint reach disk first: a run killed after this save
                    # resumes at done + 1 and would otherwise never write this step's record
                    history.append(writer.flush())
                    ckpt.save(done, policy, updater, batches)
        history.append(writer.close())
        ckpt.close()
    return [h for h in history if h]


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and XLA are chatty at INFO
    distributed.initialize()  # multi-host: from flags/SLURM/TPU VM; a no-op for one process
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/<experiment>.py is required")
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    train(_CONFIG.value)


def _define_flags():
    """Flags exist only when this module runs as a program, so that importing it (tests, other
    entry points) defines none."""
    global _CONFIG
    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
