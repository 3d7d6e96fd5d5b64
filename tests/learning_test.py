"""The learning experiment: world_igpo / world_grpo configs, their sweep, bench.learning's summary,
and (slow) a few steps of world_igpo shrunk, checking the validation and diagnostic metrics."""

from __future__ import annotations

import importlib.util
import math
import json
import os

import numpy as np
import pytest

from igpo_jax import components, config_base, sweep
from bench.learning import summarise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _flat(config) -> dict:
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(f"{prefix}{key}.", value)
            else:
                out[prefix + key] = value
    walk("", config)
    return out


def test_world_configs_differ_only_in_the_information_gain_switch():
    igpo, grpo = load_config("world_igpo"), load_config("world_grpo")
    for c in (igpo, grpo):
        config_base.validate(c)
        assert c.data.synthetic_world and c.model.path == "" and c.trainer.val_before_train
    a, b = _flat(igpo), _flat(grpo)
    assert {k for k in a if a[k] != b[k]} == {"algorithm.use_info_gain", "run_dir"}
    assert a["algorithm.use_info_gain"] and not b["algorithm.use_info_gain"]


def test_world_config_holds_out_enough_questions(tmp_path):
    c = load_config("world_igpo")
    c.run_dir = str(tmp_path)
    files = components.data_files(c)
    train, test = components.load_examples(files.train), components.load_examples(files.test)
    assert len(test) >= c.data.val_max_questions == 96
    assert len(train) >= c.data.train_batch_size * c.trainer.total_training_steps
    assert all(e.data_source == "synthetic_1hop" and e.supporting_doc_ids for e in train + test)
    # every question is answered by a place or a year (the kinds the base model writes)
    assert all(e.question.startswith(("Where was", "In which", "What is the capital")) for e in train + test)
    assert not any(e.question.startswith(("Which", "Who")) for e in train + test)
    assert not {d for e in test for d in e.supporting_doc_ids} & {d for e in train for d in e.supporting_doc_ids}


def test_sweep_runs_both_arms_for_three_seeds():
    cmds = sweep.commands(os.path.join(REPO, "configs", "sweeps", "world_igpo_vs_grpo.py"))
    runs = {next(a for a in cmd if a.startswith("--config.run_dir=")).split("/")[-1]: cmd for cmd in cmds}
    # seed by seed, so that a sweep cut short still pairs the arms
    assert list(runs) == [f"{arm}_seed{s}" for s in (0, 1, 2) for arm in ("igpo", "grpo")]
    assert "--config.algorithm.use_info_gain=False" in runs["grpo_seed2"] and "--config.seed=2" in runs["grpo_seed2"]
    assert all("--config=configs/world_igpo.py" in cmd for cmd in cmds)


def test_bench_summary_reads_step_zero_and_the_last_validation():
    records = [{"step": 0, "val/f1": -1.0, "val/no_format_f1": 0.1, "val/no_format_f1_se": 0.02,
                "val/format_error": 0.5, "val/questions": 192.0},
               {"step": 1, "diag/collapse_frac": 0.5}, {"step": 2, "diag/collapse_frac": 0.25,
                "val/f1": 0.2, "val/no_format_f1": 0.4, "val/format_error": 0.1}]
    out = summarise(records, 12.34)
    assert (out["val_f1_step0"], out["val_f1_final"]) == (-1.0, 0.2)
    assert (out["val_no_format_f1_step0"], out["val_no_format_f1_final"]) == (0.1, 0.4)
    assert out["format_error_final"] == 0.1 and out["collapse_frac_mean"] == 0.375 and out["wall_s"] == 12.3
    with pytest.raises(ValueError, match="step-0 validation"):
        summarise(records[1:], 1.0)


@pytest.mark.slow
def test_a_few_steps_of_world_igpo_shrunk_report_validation_and_diagnostics(tmp_path):
    from igpo_jax.train import train

    c = load_config("world_igpo")
    c.run_dir = str(tmp_path)
    c.data.world_questions = 64
    c.data.world_test_fraction = 0.25
    c.data.val_max_questions = 4
    c.data.val_batch_size = 4
    c.data.train_batch_size = 2
    c.rollout.n = 2
    c.rollout.max_new_tokens = 12
    c.rollout.max_tool_tokens = 64
    c.rollout.context_length = 768
    c.actor.ppo_mini_batch_size = 4  # the 4 rows of a step: one optimiser step
    c.actor.micro_batch_size = 2
    c.trainer.total_training_steps = 2
    c.trainer.test_freq = 2
    c.trainer.save_freq = 0
    c.trainer.use_tensorboard = False
    history = train(c)
    by_step = {r["step"]: r for r in history}
    assert sorted(by_step) == [0, 1, 2]
    for step in (0, 2):  # before the first update, and at the end
        v = by_step[step]
        assert v["val/questions"] == 4
        assert -2.0 <= v["val/f1"] <= 1.0 and 0.0 <= v["val/no_format_f1"] <= 1.0
        assert 0.0 <= v["val/format_error"] <= 1.0
        assert 0.0 <= v["val/f1_se"] <= 1.5 and 0.0 <= v["val/no_format_f1_se"] <= 0.5
        with open(os.path.join(str(tmp_path), "samples", f"val_step_{step:06d}.jsonl")) as f:
            episodes = [json.loads(line) for line in f]
        assert len(episodes) == 4 and all(e["answer"] is None or isinstance(e["answer"], str) for e in episodes)
        assert np.mean([not e["format_ok"] for e in episodes]) == pytest.approx(v["val/format_error"])
    for step in (1, 2):
        r = by_step[step]
        for key in ("diag/collapse_frac", "diag/searched_frac", "diag/answered_frac", "diag/format_ok_frac",
                    "diag/answer_doc_found_frac", "diag/p_gold_before_search", "diag/p_gold_final_context"):
            assert 0.0 <= r[key] <= 1.0, (key, r[key])
        # the first turn is forced to open a search (one cut off by the tiny budget does not count)
        assert r["diag/searched_frac"] > 0
        # every search turn with an IG is one of the two kinds; a format-error turn is neither
        counts = r["diag/ig_answer_doc_count"] + r["diag/ig_other_doc_count"]
        assert 0 < counts <= r["ig/count"]
        for key in ("diag/ig_answer_doc", "diag/ig_other_doc"):
            assert key not in r or (math.isfinite(r[key]) and -1.0 <= r[key] <= 1.0)


def test_sweep_summary_averages_each_arm_over_its_seeds(tmp_path, capsys):
    from bench import sweep_summary

    def run(name, f1s, collapse):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step, value in zip((0, 4, 8), f1s):
                f.write(json.dumps({"step": step, "val/no_format_f1": value, "val/format_error": 0.1}) + "\n")
                if step:
                    f.write(json.dumps({"step": step + 1, "diag/collapse_frac": collapse}) + "\n")

    run("igpo_seed0", [0.2, 0.4, 0.6], 0.0)
    run("igpo_seed1", [0.3, 0.5, 0.5], 0.5)
    run("grpo_seed0", [0.2, 0.3], 1.0)  # cut short: its arm's curve ends where it does
    sweep_summary.main([str(tmp_path), "--keys", "val/no_format_f1,val/format_error"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["igpo"]["runs"] == ["igpo_seed0", "igpo_seed1"]
    assert out["igpo"]["val/no_format_f1"]["steps"] == [0, 4, 8]
    assert out["igpo"]["val/no_format_f1"]["mean"] == pytest.approx([0.25, 0.45, 0.55])
    assert out["igpo"]["diag/collapse_frac_mean"] == pytest.approx(0.25)
    assert out["grpo"]["val/no_format_f1"]["steps"] == [0, 4] and out["grpo"]["diag/collapse_frac_mean"] == 1.0


def test_paired_difference_by_hand():
    from bench.sweep_summary import paired_difference

    # differences 0.5, 0, 0, 0.5 (question d only in one side): mean 0.25, sd 0.2887, se 0.1443
    mean, se, n = paired_difference({"a": 1.0, "b": 0.5, "c": 0.0, "e": 0.5, "d": 1.0},
                                    {"a": 0.5, "b": 0.5, "c": 0.0, "e": 0.0})
    assert n == 4 and mean == pytest.approx(0.25) and se == pytest.approx(math.sqrt(1 / 12) / 2)
    assert math.isnan(paired_difference({"a": 1.0}, {"b": 1.0})[0])


def test_sweep_summary_pairs_validation_episodes_by_question(tmp_path, capsys):
    from bench import sweep_summary
    from igpo_jax.reporting.samples import validation_samples_path, write_jsonl_at

    def run(name, f1_by_step):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step, f1s in f1_by_step.items():
                f.write(json.dumps({"step": step, "val/no_format_f1": sum(f1s) / len(f1s)}) + "\n")
                write_jsonl_at(validation_samples_path(tmp_path / name, step),
                               [{"index": f"q{i}", "no_format_f1": v} for i, v in enumerate(f1s)])

    run("igpo_seed0", {0: [0, 0, 1], 5: [1, 0, 1]})
    run("igpo_seed1", {0: [0, 0, 1], 5: [1, 1, 1]})
    run("grpo_seed0", {0: [0, 0, 1], 5: [0, 0, 1]})
    sweep_summary.main([str(tmp_path), "--keys", "val/no_format_f1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # igpo, seeds averaged per question at step 5: [1, 0.5, 1]; step 0: [0, 0, 1] → changes [1, 0.5, 0]
    change = out["change"]["igpo"]["5"]
    assert change["mean"] == pytest.approx(0.5) and change["se"] == pytest.approx(round(0.5 / math.sqrt(3), 4))
    assert out["change"]["grpo"]["5"]["mean"] == 0.0 and out["change"]["grpo"]["5"]["se"] == 0.0
    # igpo − grpo (IGPO first) at step 5: [1, 0.5, 1] − [0, 0, 1] = [1, 0.5, 0]
    assert set(out["paired"]) == {"igpo-grpo"}
    paired = out["paired"]["igpo-grpo"]
    assert paired["5"]["mean"] == pytest.approx(0.5) and paired["0"]["mean"] == 0.0


def test_sweep_summary_breaks_validation_down_by_world_question_kind(tmp_path, capsys):
    from bench import sweep_summary
    from igpo_jax.data import world
    from igpo_jax.components import world_arguments
    from igpo_jax.reporting.samples import validation_samples_path, write_jsonl_at

    data_config = {"synthetic_world": True, "world_seed": 0, "world_questions": 40,
                   "world_two_hop_fraction": 0.0, "world_test_fraction": 0.5,
                   "world_question_kinds": ["person.birthplace", "person.birth_year"]}
    test = [q for q in world.build_world(**world_arguments(data_config)).questions if q.split == "test"]
    born_where = [q.question.startswith("Where") for q in test]
    assert sum(born_where) == 10 and [q.kind == "person.birthplace" for q in test] == born_where

    def run(name, f1_of):  # f1_of(is a birthplace question) at step 4
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "config.json", "w") as f:
            json.dump({"data": data_config}, f)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step in (0, 4):
                f.write(json.dumps({"step": step, "val/no_format_f1": 0.5}) + "\n")
                write_jsonl_at(validation_samples_path(tmp_path / name, step),
                               [{"index": q.index, "no_format_f1": f1_of(w) if step else float(not w)}
                                for q, w in zip(test, born_where)])

    run("igpo_seed0", lambda where: 1.0)
    run("igpo_seed1", lambda where: float(where))
    run("grpo_seed0", lambda where: 0.0)
    sweep_summary.main([str(tmp_path), "--keys", "val/no_format_f1"])
    printed = capsys.readouterr().out.strip().splitlines()
    kinds = json.loads(printed[-1])["by_kind"]
    assert kinds["igpo"]["0"] == {"person.birth_year": {"mean": 1.0, "questions": 10},
                                  "person.birthplace": {"mean": 0.0, "questions": 10}}
    # seeds averaged per question: birthplace (1 + 1) / 2, birth year (1 + 0) / 2
    assert kinds["igpo"]["4"] == {"person.birth_year": {"mean": 0.5, "questions": 10},
                                  "person.birthplace": {"mean": 1.0, "questions": 10}}
    assert kinds["grpo"]["4"]["person.birthplace"]["mean"] == 0.0
    assert any(line.startswith("igpo step 4 no-format F1 by question kind") and "person.birthplace 1.00 (10)"
               in line for line in printed)
