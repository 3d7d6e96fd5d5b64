"""Evaluate a policy on the config's test files: greedy (or sampled) episodes, per-question JSONL
and a per-`data_source` table of F1, EM and no-format F1 (the reference's definitions).

    python -m igpo_jax.evaluate --config=configs/qwen2_5_7b_igpo.py --checkpoint=runs/x/checkpoints [--step=60]
    python -m igpo_jax.evaluate --config=configs/demo.py --model=/path/to/hf_dir_or.gguf --out=runs/eval

Without --checkpoint/--model it evaluates the config's own model.path. episodes.jsonl holds the
training samples' records (reporting/samples.py: turns, queries, results, P(gold) per turn and
information gain; no advantages), so `python -m igpo_jax.report OUT_DIR` renders it; --nop_gold
skips the one scoring forward per episode that P(gold) costs.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from igpo_jax import components
from igpo_jax.data import examples as examples_lib
from igpo_jax.runtime import sharding
from igpo_jax.training import checkpoint
from igpo_jax.rollout.episodes import make_sampler, rollout
from igpo_jax.igpo.evaluation import format_table, summary
from igpo_jax.igpo import pipeline, scoring
from igpo_jax.reporting import progress, samples


def evaluate(config, policy, tokenizer, examples, out_dir: str, sampled: bool = False, p_gold: bool = True):
    """Writes out_dir/episodes.jsonl (sample records, one per question) and out_dir/summary.json;
    returns the summary table. `p_gold` scores every turn's gold-answer probability."""
    rcfg = components.rollout_config(config, validation=not sampled)
    batch = min(config.data.val_batch_size, len(examples))
    sampler = make_sampler(components.in_dtype(policy, config.rollout.dtype), tokenizer, rcfg, batch)
    os.makedirs(out_dir, exist_ok=True)
    records = []
    show = progress.enabled(config.trainer.progress)
    with components.search_backend(config, components.data_files(config).corpus) as search, \
            open(os.path.join(out_dir, "episodes.jsonl"), "w") as f, \
            progress.bar(len(examples), "evaluate", show, unit="ep", leave=True) as bar:
        on_progress = progress.rollout_callback(bar)
        for chunk in examples_lib.evaluation_batches(examples, batch):
            traj, _ = rollout(chunk, 1, sampler, tokenizer, search, rcfg, seed=0, on_progress=on_progress)
            scores = None
            if p_gold:
                pts = scoring.pseudo_turns(tokenizer, [pipeline.ANSWER_SPLIT.join(ep.golden_answers)
                                                       for ep in traj.episodes], config.algorithm.pseudo_turn_template)
                scores = scoring.score_one_pass(policy, traj, pts, config.algorithm.scoring_batch_size)
            for record in samples.episode_samples(
                    traj, chunk, tokenizer, rcfg, format_penalty=config.algorithm.format_penalty,
                    mean_logp_NT=None if scores is None else scores.mean_logp_NT,
                    valid_NT=None if scores is None else scores.valid_NT,
                    info_gain_type=config.algorithm.info_gain_type):
                records.append(record)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()  # a long evaluation shows its episodes as they finish
    table = summary(records)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(table, f, indent=2)
    return table


def main(argv):
    del argv
    components.start_program()
    progress.line_buffered_stdout()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<experiment>.py is required")
    mesh, rules = components.mesh_and_rules(config)
    examples = components.load_examples(components.data_files(config).test, config.data.val_max_questions)
    if not examples:
        raise app.UsageError("no test questions: set config.data.test_files (or synthetic_world)")
    with sharding.activate(mesh, rules):
        policy, tokenizer = components.load_policy(config, mesh, rules, path=_MODEL.value or None)
        if _CHECKPOINT.value:
            checkpoint.restore_params(_CHECKPOINT.value, policy, step=_STEP.value)
        table = evaluate(config, policy, tokenizer, examples, _OUT.value or os.path.join(config.run_dir, "eval"),
                         _SAMPLED.value, _P_GOLD.value)
    print(format_table(table))


def _define_flags():
    """Flags exist only when this module runs as a program, so that importing it (tests, other
    entry points) defines none."""
    global _CONFIG, _CHECKPOINT, _STEP, _MODEL, _OUT, _SAMPLED, _P_GOLD
    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    _CHECKPOINT = flags.DEFINE_string("checkpoint", "", "a run's checkpoint directory")
    _STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
    _MODEL = flags.DEFINE_string("model", "", "an HF model directory or .gguf file instead of config.model.path")
    _OUT = flags.DEFINE_string("out", "", "output directory (default: <run_dir>/eval)")
    _SAMPLED = flags.DEFINE_bool("sampled", False, "sample with the training temperature instead of greedy")
    _P_GOLD = flags.DEFINE_bool("p_gold", True, "score each turn's gold-answer probability (one forward per episode)")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
