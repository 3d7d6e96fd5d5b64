"""The training program end to end on a tiny random model with mock search, and exact resume."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from igpo_jax import components, config_base
from igpo_jax.data import examples as examples_lib
from igpo_jax.reporting import samples as samples_lib
from igpo_jax.reporting import metrics
from igpo_jax.training import checkpoint
from igpo_jax.train import algorithm_config, old_logp_source, train, update_config
from tests.conftest import write_tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's real tokenizer (so tags and chat templates are real)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_hf_model("llama", path, vocab_size=len(smollm2_tokenizer), tie_word_embeddings=True)
    smollm2_tokenizer.save_pretrained(str(path))
    return str(path)


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def smoke_config(model_dir: str, run_dir: str, steps: int):
    c = load_config("demo")
    c.run_dir = run_dir
    c.model.path = model_dir
    c.search.mock_mode = True
    c.data.world_questions = 40
    c.data.val_max_questions = 2
    c.data.val_batch_size = 2
    c.data.train_batch_size = 2  # set here: the demo's own shape may change
    c.rollout.n = 2
    c.rollout.max_new_tokens = 6
    c.rollout.max_tool_tokens = 24
    c.rollout.context_length = 512
    c.rollout.overlap_search = False  # a fixed decode/append schedule: bitwise-reproducible rollouts
    c.actor.micro_batch_size = 2
    c.actor.ppo_mini_batch_size = 0  # one optimiser step over the step's 4 rollouts
    c.actor.warmup_steps = 0
    c.actor.lr = 1e-3
    c.trainer.sample_freq = 0
    c.trainer.total_training_steps = steps
    c.trainer.save_freq = 1
    c.trainer.test_freq = 2
    c.trainer.val_before_train = False  # the tests count steps from 1 (learning_test covers step 0)
    c.trainer.use_tensorboard = True
    return c


def _comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(("time/", "memory/", "rollout/decode_s", "rollout/search"))}


def test_two_step_smoke_run_writes_metrics_checkpoints_and_validation(tiny_model_dir, tmp_path):
    history = train(smoke_config(tiny_model_dir, str(tmp_path / "run"), steps=2))
    assert [h["step"] for h in history] == [1, 2]
    for key in ("reward/mean", "reward/f1", "reward/em", "reward/format_error_rate", "ig/mean", "ig/std",
                "rollout/turns_per_episode", "rollout/searches_per_episode", "search/failures",
                "response_length/mean", "actor/kl_ref", "actor/pg_clipfrac_upper", "actor/entropy",
                "actor/grad_norm", "actor/lr", "time/rollout_s", "time/scoring_s", "time/update_s",
                "time/rollout_tok_s", "time/update_tok_s"):
        assert key in history[0], key
    assert "val/f1" in history[1] and "val/f1" not in history[0]
    # peak memory so far, after each phase: positive and never falling within a step or across steps
    peaks = [h[f"memory/peak_rss_after_{p}_gib"] for h in history for p in ("rollout", "scoring", "update")]
    assert 0 < peaks[0] and peaks == sorted(peaks), peaks
    assert history[1]["memory/peak_rss_after_validation_gib"] >= peaks[-1]
    assert history[0]["response_length/mean"] > 0 and history[0]["actor/grad_norm"] > 0
    # seconds spent compiling (or loading from the cache): the first step builds every phase's programs;
    # the phases' and validation's compile seconds are parts of the step's
    first, second = history
    phases = [first[f"time/{p}_compile_s"] for p in ("rollout", "scoring", "update")]
    assert all(0 < c <= first[f"time/{p}_s"] for c, p in zip(phases, ("rollout", "scoring", "update"))), first
    assert sum(phases) <= first["time/compile_s"] + 1e-6
    assert 0 <= second["time/validation_compile_s"] <= second["time/validation_s"]
    assert second["time/validation_compile_s"] <= second["time/compile_s"] + 1e-6
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "run")] == [1, 2]
    assert glob.glob(str(tmp_path / "run" / "tensorboard" / "*"))
    assert checkpoint.available_steps(tmp_path / "run" / "checkpoints") == [1, 2]


def _train_in_subprocess_until_killed(model_dir: str, run_dir: str, steps: int, kill_after_checkpoint: int):
    """Starts the training program, SIGKILLs it as soon as checkpoint `kill_after_checkpoint`
    is complete (a later save may be half written: that is part of the test)."""
    import signal
    import subprocess
    import sys
    import time

    config_file = os.path.join(os.path.dirname(run_dir), "killed_run_config.py")
    with open(config_file, "w") as f:  # the same smoke config, as a config file for the program
        f.write("from tests.train_test import smoke_config\n\n\ndef get_config():\n"
                f"    return smoke_config({model_dir!r}, {run_dir!r}, {steps})\n")
    args = [sys.executable, "-m", "igpo_jax.train", f"--config={config_file}"]
    log_path = os.path.join(os.path.dirname(run_dir), "killed_run.log")
    log = open(log_path, "w")  # a file, not a pipe: nobody reads while it runs
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"training exited before it was killed: {open(log_path).read()[-3000:]}")
            done = os.path.exists(os.path.join(run_dir, "checkpoints")) and \
                kill_after_checkpoint in checkpoint.available_steps(os.path.join(run_dir, "checkpoints"))
            if done:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.2)
        raise AssertionError("no checkpoint within 600 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_resume_after_a_kill_continues_exactly(tiny_model_dir, tmp_path):
    straight = train(smoke_config(tiny_model_dir, str(tmp_path / "a"), steps=4))
    run_b = str(tmp_path / "b")
    _train_in_subprocess_until_killed(tiny_model_dir, run_b, steps=4, kill_after_checkpoint=2)
    assert 2 in checkpoint.available_steps(os.path.join(run_b, "checkpoints"))
    resumed = train(smoke_config(tiny_model_dir, run_b, steps=4))  # resumes after the newest checkpoint
    first_resumed = resumed[0]["step"]
    assert first_resumed in (3, 4)  # the killed process may have finished step 3's save
    records = {r["step"]: r for r in metrics.read_jsonl(run_b)}
    for a in straight:
        assert _comparable(a) == pytest.approx(_comparable(records[a["step"]]), rel=1e-6, abs=1e-9, nan_ok=True), \
            a["step"]
    params = []
    for run in ("a", "b"):
        model, _ = components.load_policy(smoke_config(tiny_model_dir, str(tmp_path / run), 4))
        checkpoint.restore_params(tmp_path / run / "checkpoints", model, step=4)
        params.append(jax.tree.leaves(nnx.state(model)))
    for x, y in zip(*params):
        np.testing.assert_array_equal(x, y)


def test_resume_mid_run_with_warmup_curriculum_and_mini_batches_continues_identically(tiny_model_dir, tmp_path):
    """Two optimiser steps per RL step (π_old from the scoring pass), the lr still warming up and a
    curriculum (joint normalisation): a run that lost its last checkpoint (killed while saving
    step 3, whose metrics were already on disk) resumes from step 2, runs step 3 again exactly as
    before (metrics and params), and records every step once (metrics.jsonl and TensorBoard)."""
    import shutil

    from tests.metrics_test import tensorboard_scalars_as_shown

    c = smoke_config(tiny_model_dir, str(tmp_path / "run"), steps=3)
    c.data.train_batch_size = 4
    c.actor.ppo_mini_batch_size = 4  # 4 questions × 2 = 8 rollouts: two optimiser steps per RL step
    c.actor.warmup_steps = 5  # optimiser steps 1..5: step 3's first one is still in the warm-up
    c.algorithm.use_curriculum, c.algorithm.info_gain_norm_mode = True, "joint"
    c.trainer.save_freq, c.trainer.test_freq = 2, 0  # checkpoints at 2 and 3 (the last)
    assert old_logp_source(c, update_config(c), 8) == "scoring"
    straight = train(c)
    assert [h["step"] for h in straight] == [1, 2, 3]
    checkpoints = tmp_path / "run" / "checkpoints"
    model, _ = components.load_policy(c)
    checkpoint.restore_params(checkpoints, model, step=3)
    params_straight = jax.tree.map(np.asarray, jax.tree.leaves(nnx.state(model)))
    shutil.rmtree(checkpoints / "3")

    resumed = train(c)
    assert [h["step"] for h in resumed] == [3]
    lines = open(tmp_path / "run" / metrics.METRICS_FILE).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    shown = tensorboard_scalars_as_shown(tmp_path / "run" / "tensorboard")["reward/mean"]
    assert [step for step, _ in shown] == [1, 2, 3]
    assert _comparable(resumed[0]) == pytest.approx(_comparable(straight[2]), rel=1e-6, abs=1e-9, nan_ok=True)
    # warm-up: Adam's step count was restored (4 and 5 of 5), and both optimiser steps are logged
    assert resumed[0]["actor/lr"] == pytest.approx((4 / 5 + 5 / 5) / 2 * c.actor.lr, rel=1e-6)
    checkpoint.restore_params(checkpoints, model, step=3)
    for x, y in zip(params_straight, jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", sorted(os.path.splitext(os.path.basename(p))[0]
                                         for p in glob.glob(os.path.join(REPO, "configs", "*.py"))))
def test_every_config_builds_its_pipeline_on_a_tiny_model(name, tiny_model_dir):
    from igpo_jax.rollout.episodes import make_sampler
    from igpo_jax.training.update import Updater

    c = load_config(name)
    c.model.path = tiny_model_dir
    c.model.param_dtype = c.model.dtype = "float32"
    c.mesh.shape = {"data": -1}
    c.rollout.min_span = 256  # not the sampler's own default: it must come from the config
    config_base.validate(c)
    assert c.run_dir and c.trainer.total_training_steps > 0
    model, tokenizer = components.load_policy(c)
    sampler = make_sampler(model, tokenizer, components.rollout_config(c), num_rows=2)
    assert sampler.min_span == c.rollout.min_span
    Updater(model, update_config(c))
    algorithm_config(c)


def test_a_config_built_on_a_sibling_and_a_missing_sibling():
    grpo = load_config("world_grpo")
    assert not grpo.algorithm.use_info_gain and grpo.rollout.n == load_config("world_igpo").rollout.n
    with pytest.raises(FileNotFoundError, match="no config .*nonexistent.py"):
        config_base.sibling_config(os.path.join(REPO, "configs", "demo.py"), "nonexistent")


def test_bad_config_values_fail_fast_naming_the_key():
    c = load_config("demo")
    c.algorithm.info_gain_norm_mode = "jiont"
    with pytest.raises(ValueError, match=r"config.algorithm.info_gain_norm_mode='jiont' is not allowed"):
        config_base.validate(c)
    c = load_config("demo")
    c.actor.ppo_mini_batch_size = 3
    with pytest.raises(ValueError, match=r"ppo_mini_batch_size=3 must divide train_batch_size × n = 16"):
        config_base.validate(c)
    c = load_config("demo")
    c.data.synthetic_world = False
    with pytest.raises(ValueError, match="set config.data.train_files"):
        config_base.validate(c)
    c = load_config("demo")
    c.rollout.n = 0
    with pytest.raises(ValueError, match=r"config.rollout.n=0 must be > 0"):
        config_base.validate(c)
    c = load_config("demo")
    c.rollout.min_span = 0
    with pytest.raises(ValueError, match=r"config.rollout.min_span=0 must be > 0"):
        config_base.validate(c)
    c = load_config("demo")
    c.rollout.dtype = "bf16"
    with pytest.raises(ValueError, match=r"config.rollout.dtype='bf16' is not allowed"):
        config_base.validate(c)
    c = load_config("demo")
    c.trainer.rollout_budget = 15
    with pytest.raises(ValueError, match=r"rollout_budget=15 must be 0 \(off\) or an integer ≥ one step's rollouts "
                                         r"\(data.train_batch_size × rollout.n = 16\)"):
        config_base.validate(c)


def test_frozen_copy_keeps_its_values_when_the_policy_buffers_are_donated(tiny_model_dir):
    from igpo_jax.training.update import UpdateBatch, UpdateConfig, Updater
    c = load_config("demo")
    c.model.path = tiny_model_dir
    policy, _ = components.load_policy(c)
    reference = components.frozen_copy(policy)
    before = jax.tree.map(np.asarray, nnx.state(reference))
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 50
    mask = np.ones((2, 8), np.float32)
    batch = UpdateBatch(tokens, np.ones((2, 8), bool), mask, mask, np.zeros((2, 8)), np.zeros((2, 8)))
    Updater(policy, UpdateConfig(lr=1e-2, use_kl_loss=False)).update(batch)  # donates the policy's params
    after = jax.tree.map(np.asarray, nnx.state(reference))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - np.asarray(b)).max(), before, nnx.state(policy)))
    assert max(moved) > 0  # the policy did change


def test_rollout_dtype_samples_from_a_cast_copy_that_follows_the_policy(tiny_model_dir):
    from igpo_jax.training.update import UpdateBatch, UpdateConfig, Updater
    c = load_config("demo")
    c.model.path = tiny_model_dir
    policy, _ = components.load_policy(c)
    assert components.in_dtype(policy, None) is policy and components.in_dtype(policy, "float32") is policy
    copy = components.in_dtype(policy, "bfloat16")
    assert copy.cfg.dtype == copy.cfg.param_dtype == "bfloat16" and policy.cfg.dtype == "float32"
    for ours, theirs in zip(jax.tree.leaves(nnx.state(copy)), jax.tree.leaves(nnx.state(policy))):
        assert ours.dtype == np.dtype("bfloat16") and theirs.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs.astype("bfloat16")))

    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 50
    mask = np.ones((2, 8), np.float32)
    batch = UpdateBatch(tokens, np.ones((2, 8), bool), mask, mask, np.zeros((2, 8)), np.zeros((2, 8)))
    before_update = copy.embed[...]
    Updater(policy, UpdateConfig(lr=1e-2, use_kl_loss=False)).update(batch)
    refreshed = components.in_dtype(policy, "bfloat16", copy)
    assert refreshed is copy  # in place: a sampler holding `copy` samples from the new weights
    embed = np.asarray(policy.embed[...])
    np.testing.assert_array_equal(np.asarray(copy.embed[...]), np.asarray(policy.embed[...].astype("bfloat16")))
    assert np.abs(np.asarray(copy.embed[...], np.float32) - np.asarray(before_update)).max() > 0
    assert np.abs(np.asarray(copy.embed[...], np.float32) - embed).max() < 1e-2 * np.abs(embed).max()


def test_smoke_run_with_bf16_rollouts(tiny_model_dir, tmp_path):
    c = smoke_config(tiny_model_dir, str(tmp_path / "run"), steps=2)
    c.rollout.dtype = "bfloat16"
    c.trainer.save_freq = 0
    history = train(c)
    assert [h["step"] for h in history] == [1, 2]
    assert history[0]["response_length/mean"] > 0 and history[0]["actor/grad_norm"] > 0
    assert "val/f1" in history[1]


class _SavedIteratorState:
    """Stands in for the data iterator when a checkpoint is read: keeps the state it is given."""

    state = None

    def restore(self, state):
        self.state = dict(state)


def three_rounds_a_step_config(model_dir: str, run_dir: str, steps: int):
    """Dynamic sampling by 'score' capped at 3 rounds: with the tiny model every group ties, so
    every step runs all 3."""
    c = smoke_config(model_dir, run_dir, steps)
    c.algorithm.filter_groups.enable = True
    c.algorithm.filter_groups.metric = "score"
    c.algorithm.filter_groups.max_num_gen_batches = 3
    return c


def test_dynamic_sampling_rolls_out_more_questions_and_fills_at_its_cap(tiny_model_dir, tmp_path):
    """A tiny random model never writes an answer: every rollout gets the format penalty, every
    group's outcome rewards tie, so filter_groups by 'score' drops them all, rolls out the next
    questions until its cap of 3 rounds, then trains on dropped groups (the batch keeps its shape).
    The data iterator moved 3 batches a step, and the checkpoint says so."""
    c = three_rounds_a_step_config(tiny_model_dir, str(tmp_path / "run"), steps=2)
    c.trainer.test_freq = 0
    c.trainer.sample_freq = 1
    history = train(c)
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert h["reward/format_error_rate"] == 1.0  # the premise: all rewards tie
        assert {k: v for k, v in h.items() if k.startswith("filter_groups/")} == {
            "filter_groups/rounds": 3.0, "filter_groups/generated": 6.0, "filter_groups/informative": 0.0,
            "filter_groups/dropped": 6.0, "filter_groups/kept": 0.0, "filter_groups/filled": 2.0,
            "filter_groups/cap_hit": 1.0}
        # rollout metrics cover every round's 12 rollouts; the update ran on the batch of 4
        assert h["response_length/mean"] > 0 and np.isfinite(h["actor/loss"])
        assert h["time/rollout_s"] > 0 and h["time/scoring_s"] > 0
    model, _ = components.load_policy(c)
    saved = _SavedIteratorState()
    with checkpoint.RunCheckpointer(tmp_path / "run" / checkpoint.CHECKPOINTS_SUBDIR) as ckpt:
        ckpt.restore(model, batches=saved, step=2)
    assert saved.state["position"] == 2 * 3 * c.data.train_batch_size and saved.state["epoch"] == 0
    # step 2 trained on the earliest dropped groups: its first round's questions (the data's 4th
    # batch), and its samples pair each rollout with its own question
    train_examples = components.load_examples(components.data_files(c).train)
    batches = examples_lib.BatchIterator(train_examples, c.data.train_batch_size, seed=c.seed, shuffle=c.data.shuffle)
    first_round_of_step_2 = [next(batches) for _ in range(4)][3]
    records = samples_lib.read_samples(str(tmp_path / "run"), step=2)
    assert [r["index"] for r in records] == [e.index for e in first_round_of_step_2 for _ in range(c.rollout.n)]
    question_of = {e.index: e.question for e in train_examples}
    assert all(r["question"] == question_of[r["index"]] for r in records)


def test_dynamic_sampling_with_every_group_informative_trains_as_without_it(tiny_model_dir, tmp_path):
    """IGPO's gains differ between a tiny random model's rollouts, so by 'advantage' every group is
    informative: one round, the same rollouts (the first round keeps the step's seeds), the same update."""
    plain = smoke_config(tiny_model_dir, str(tmp_path / "plain"), steps=1)
    plain.trainer.save_freq = plain.trainer.test_freq = 0
    filtered = smoke_config(tiny_model_dir, str(tmp_path / "filtered"), steps=1)
    filtered.trainer.save_freq = filtered.trainer.test_freq = 0
    filtered.algorithm.filter_groups.enable = True
    assert filtered.algorithm.use_info_gain and filtered.algorithm.filter_groups.metric == "advantage"
    [a], [b] = train(plain), train(filtered)
    assert b["filter_groups/rounds"] == 1.0 and b["filter_groups/kept"] == 2.0 and b["filter_groups/cap_hit"] == 0
    assert _comparable({k: v for k, v in b.items() if not k.startswith("filter_groups/")}) == \
        pytest.approx(_comparable(a), rel=1e-6, abs=1e-9, nan_ok=True)


def test_a_rollout_budget_ends_the_run_where_dynamic_sampling_has_generated_it(tiny_model_dir, tmp_path):
    """Every group ties (a tiny random model never answers), so filter_groups rolls out 3 rounds a
    step: 12 rollouts. A budget of 24 ends a 5-step run after step 2, which validates and
    checkpoints as a last step does (neither frequency would); the run resumed does nothing more."""
    c = three_rounds_a_step_config(tiny_model_dir, str(tmp_path / "run"), steps=5)
    c.trainer.rollout_budget = 24
    c.trainer.test_freq = 5
    c.trainer.save_freq = 5
    history = train(c)
    assert [h["step"] for h in history] == [1, 2]
    assert [h["trainer/generated_rollouts"] for h in history] == [12.0, 24.0]
    assert "val/f1" in history[1] and "val/f1" not in history[0]
    assert checkpoint.latest_step(tmp_path / "run") == 2
    assert train(c) == []  # resumed at step 2: the budget is spent, no step runs
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "run"))] == [1, 2]
