"""The learning experiment: world_igpo / world_grpo configs, their sweep, bench.learning's summary,
and (slow) the demo's learning run: held-out F1 rises, the format holds, and searches that found the
answer's document gain more information than the others."""

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


# ------------------------------------------------------------------------- the slow learning run
# configs/demo.py as it is (world_igpo's questions, seed 0, 12 steps of 4 questions × 4 rollouts at
# lr 1e-5, greedy validation on 48 held-out questions at steps 0 and 12), ~10 minutes alone on
# 2 cores. Its bounds, each with the measurement behind it and a margin for seed and code noise:
#
# The rise of val/no_format_f1 from step 0 to step 12: at least 0.25 (the demo's target, issue 29)
# and at least two standard errors of the difference. Measured: the demo 0.458 ± 0.073 -> 0.917 ±
# 0.040, +0.458, where two standard errors are 0.17 (bench/results/demo.md, 2026-12-07); world_igpo,
# the same 12 steps validated on 96 questions, +0.395 to +0.479 in all 6 runs (3 seeds × IGPO/GRPO,
# bench/results/world_igpo.md, 2026-12-06). A run that flips to one answer type on its way (IGPO
# seed 0 at step 8: +0.09) was back by step 12 in every measured run.
MIN_NO_FORMAT_F1_RISE = 0.25
RISE_STANDARD_ERRORS = 2.0
# The final format error: at most 0.10 (5 of 48 questions). Measured 0 at both validations of the
# demo and at every validation of the 6 world_igpo runs but GRPO seed 2's 0.010; the learning
# target is below 0.2 (bench/results/world_igpo.md).
MAX_FINAL_FORMAT_ERROR = 0.10
# Information gain of the search turns whose results held the answer's document against the
# others, each pooled over the 12 training steps (weighted by the turn counts): at least 0.3 apart,
# and every step's answer-document gain above 0.3. Measured in the demo run of 2026-12-07
# (metrics.jsonl): answer's document 0.68-0.91 a step (11-16 turns a step), pooled 0.81; other
# documents -0.02, -0.10 and 0.00 at steps 1, 2 and 7 (5, 4 and 1 turns: the base model's forced
# search named the wrong entity; none at the other steps), pooled -0.05: a gap of 0.86.
MIN_IG_GAP_ANSWER_DOC_OVER_OTHERS = 0.3
MIN_IG_ANSWER_DOC = 0.3
# P(gold) in the final turn's context (after the search result) above P(gold) before the search,
# every step, by at least 0.2. Measured 0.50-0.97 against 0.007-0.15 (smallest gap 0.46, step 1).
MIN_P_GOLD_GAIN = 0.2


def pooled(records: list[dict], name: str) -> tuple[float, float]:
    """(mean, count) of diag/ig_{name} over the records, weighted by diag/ig_{name}_count."""
    count = sum(r[f"diag/ig_{name}_count"] for r in records)
    total = sum(r[f"diag/ig_{name}"] * r[f"diag/ig_{name}_count"] for r in records if r[f"diag/ig_{name}_count"])
    return (total / count if count else float("nan")), count


def check_learning(records: list[dict], val_samples: dict[int, list[dict]], questions: int, steps: int):
    """The learning run's records (metrics.jsonl) and validation samples (by step) meet the bounds above."""
    by_step = {int(r["step"]): r for r in records}
    assert sorted(by_step) == list(range(steps + 1))
    first, last = by_step[0], by_step[steps]
    for step, v in ((0, first), (steps, last)):
        assert v["val/questions"] == questions
        # the logged validation figures are those of the episodes written beside them
        episodes = val_samples[step]
        assert len(episodes) == questions
        assert np.mean([e["no_format_f1"] for e in episodes]) == pytest.approx(v["val/no_format_f1"])
        assert np.mean([e["f1"] for e in episodes]) == pytest.approx(v["val/f1"])
        assert np.mean([not e["format_ok"] for e in episodes]) == pytest.approx(v["val/format_error"])
    rise = last["val/no_format_f1"] - first["val/no_format_f1"]
    noise = RISE_STANDARD_ERRORS * math.hypot(first["val/no_format_f1_se"], last["val/no_format_f1_se"])
    assert rise >= max(MIN_NO_FORMAT_F1_RISE, noise), (first["val/no_format_f1"], last["val/no_format_f1"], noise)
    assert last["val/format_error"] <= MAX_FINAL_FORMAT_ERROR
    train_steps = [by_step[s] for s in range(1, steps + 1)]
    for r in train_steps:
        assert r["diag/searched_frac"] == 1.0, r["step"]  # turn 1 is forced to open <search>
        assert r["diag/ig_answer_doc_count"] + r["diag/ig_other_doc_count"] == r["ig/count"], r["step"]
        if r["diag/ig_answer_doc_count"]:
            assert r["diag/ig_answer_doc"] >= MIN_IG_ANSWER_DOC, r["step"]
        gain = r["diag/p_gold_final_context"] - r["diag/p_gold_before_search"]
        assert gain >= MIN_P_GOLD_GAIN, (r["step"], gain)
    (answer_ig, answer_n), (other_ig, other_n) = pooled(train_steps, "answer_doc"), pooled(train_steps, "other_doc")
    assert answer_n and other_n, ("no search turn of one kind: the comparison needs both", answer_n, other_n)
    assert answer_ig - other_ig >= MIN_IG_GAP_ANSWER_DOC_OVER_OTHERS, (answer_ig, other_ig)


@pytest.mark.slow
def test_the_demo_learns_to_answer_from_what_it_finds(tmp_path):
    from igpo_jax.reporting.metrics import read_jsonl
    from igpo_jax.reporting.samples import read_samples, validation_samples_path
    from igpo_jax.train import train

    c = load_config("demo")
    c.run_dir = str(tmp_path)
    c.trainer.save_freq = 0  # no checkpoints: they change nothing the run learns
    c.trainer.use_tensorboard = False
    train(c)
    steps = c.trainer.total_training_steps
    val_samples = {step: read_samples(validation_samples_path(tmp_path, step)) for step in (0, steps)}
    check_learning(read_jsonl(tmp_path), val_samples, questions=c.data.val_max_questions, steps=steps)


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
    assert out["igpo"]["diag/outcome_collapse_frac_mean"] is None  # not logged by these runs: null, not NaN
    assert out["igpo"]["diag/collapse_frac_by_step"] == {"steps": [5, 9], "mean": [0.25, 0.25]}
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


def test_sweep_summary_pairs_each_run_at_its_last_validation_with_the_rollouts_it_generated(tmp_path, capsys):
    """Dynamic sampling under a shared trainer.rollout_budget ends sooner: at equal generation the
    arms are compared at their last validations, not at equal steps."""
    from bench import sweep_summary
    from igpo_jax.reporting.samples import validation_samples_path, write_jsonl_at

    def run(name, f1_by_step, generated):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step, f1s in f1_by_step.items():
                f.write(json.dumps({"step": step, "val/no_format_f1": sum(f1s) / len(f1s),
                                    **({"trainer/generated_rollouts": generated[step]} if step else {})}) + "\n")
                write_jsonl_at(validation_samples_path(tmp_path / name, step),
                               [{"index": f"q{i}", "no_format_f1": v} for i, v in enumerate(f1s)])

    run("grpo_seed0", {0: [0, 0, 1], 2: [0, 0, 1], 4: [1, 0, 1]}, {2: 8.0, 4: 16.0})
    run("grpo_ds_seed0", {0: [0, 0, 1], 2: [1, 1, 1]}, {2: 16.0})
    sweep_summary.main([str(tmp_path), "--keys", "val/no_format_f1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["grpo_ds"]["final"] == {"grpo_ds_seed0": {"step": 2, "generated_rollouts": 16.0}}
    assert out["grpo"]["final"] == {"grpo_seed0": {"step": 4, "generated_rollouts": 16.0}}
    # at equal steps (2): [0, 0, 1] − [1, 1, 1]; at the last validations: [1, 0, 1] − [1, 1, 1]
    paired = out["paired"]["grpo-grpo_ds"]
    assert paired["2"]["mean"] == pytest.approx(-2 / 3, abs=1e-4)
    assert paired["final"]["mean"] == pytest.approx(-1 / 3, abs=1e-4)
    assert out["change"]["grpo_ds"]["final"]["mean"] == pytest.approx(2 / 3, abs=1e-4)


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


def test_search_queries_reads_each_search_turn_of_a_response():
    from bench.sweep_summary import search_queries

    response = ("<search> Ilsa Varn </search>\n\n<information>Results for \"Ilsa Varn\":\n1. Ilsa Varn\n"
                "Ilsa Varn works for <b>Pemdo</b> Labs.</information>\n\nsome prose\n\n<information>"
                "Your previous action could not be run.</information>\n\n<search> Pemdo Labs </search>"
                "\n\n<information>...</information>\n\n<answer> Krada </answer>")
    assert search_queries(response) == [("Ilsa Varn",), ("Pemdo Labs",)]
    assert search_queries("<answer> 1940 </answer>") == []


def test_sweep_summary_reports_the_bridge_query_rate_and_steps_to_reach_grpo(tmp_path, capsys):
    from bench import sweep_summary
    from igpo_jax.data import world
    from igpo_jax.components import world_arguments
    from igpo_jax.reporting.samples import validation_samples_path, write_jsonl_at

    data_config = {"synthetic_world": True, "world_seed": 0, "world_questions": 8,
                   "world_two_hop_fraction": 1.0, "world_test_fraction": 0.5,
                   "world_question_kinds": ["person.employer.city"]}
    built = world.build_world(**world_arguments(data_config))
    test = [q for q in built.questions if q.split == "test"][:4]
    bridge = [built.document(q.supporting_doc_ids[-1]).title for q in test]

    def response(i, names_bridge):
        second = bridge[i] if names_bridge else bridge[i].split()[0]  # half a name does not count
        return (f"<search> someone </search>\n\n<information>x</information>\n\n<search> {second} </search>"
                "\n\n<information>y</information>\n\n<answer> z </answer>")

    def run(name, f1s, named):  # named[step]: which of the 4 questions' second search names the bridge
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "config.json", "w") as f:
            json.dump({"data": data_config, "rollout": {"dialect": "search_tags"}}, f)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step, f1 in zip((0, 4, 8), f1s):
                f.write(json.dumps({"step": step, "val/no_format_f1": f1}) + "\n")
                write_jsonl_at(validation_samples_path(tmp_path / name, step),
                               [{"index": q.index, "no_format_f1": f1, "response": response(i, named[step][i])}
                                for i, q in enumerate(test)])

    none, two, all_ = [False] * 4, [True, True, False, False], [True] * 4
    run("grpo_seed0", [0.2, 0.3, 0.4], {0: none, 4: two, 8: two})
    run("igpo_seed0", [0.2, 0.4, 0.6], {0: none, 4: all_, 8: all_})
    run("igpo_seed1", [0.2, 0.3, 0.3], {0: none, 4: none, 8: two})
    sweep_summary.main([str(tmp_path), "--keys", "val/no_format_f1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bridge"]["grpo"]["4"] == {"bridge_query_frac": 0.5, "second_query_frac": 1.0, "episodes": 4}
    # every seed's episodes pooled: (4 + 0) / 8 at step 4, (4 + 2) / 8 at step 8
    assert out["bridge"]["igpo"]["0"]["bridge_query_frac"] == 0.0
    assert out["bridge"]["igpo"]["4"]["bridge_query_frac"] == 0.5 and out["bridge"]["igpo"]["4"]["episodes"] == 8
    assert out["bridge"]["igpo"]["8"]["bridge_query_frac"] == 0.75
    # GRPO ends at 0.4; IGPO's mean curve (0.2, 0.35, 0.45) first reaches it at step 8
    assert out["steps_to_reach"] == {"igpo": 8}
