"""Two smoke runs (IGPO and GRPO, tiny model, mock search) seen as a user sees them: a console line
per step as the step ends, sample files that agree with the scoring, and the HTML report."""

from __future__ import annotations

import base64
import contextlib
import io
import math
from html.parser import HTMLParser

import numpy as np
import pytest

from igpo_jax import report, train as train_lib
from igpo_jax.igpo import scoring
from igpo_jax.reporting import samples
from tests.samples_test import FIELDS, TURN_FIELDS
from tests.train_test import smoke_config, tiny_model_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Trains both runs once; records what stdout held whenever a rollout started, and every
    scoring output, in call order."""
    root = tmp_path_factory.mktemp("runs")
    events = {"rollouts": [], "scores": []}
    out = io.StringIO()
    real_rollout, real_score = train_lib.rollout, scoring.score_one_pass

    def rollout(examples, group_size, *args, **kwargs):
        events["rollouts"].append((group_size, out.getvalue()))
        return real_rollout(examples, group_size, *args, **kwargs)

    def score_one_pass(*args, **kwargs):
        result = real_score(*args, **kwargs)
        events["scores"].append((np.array(result.mean_logp_NT), np.array(result.valid_NT)))
        return result

    dirs = {}
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(train_lib, "rollout", rollout)
        mp.setattr(scoring, "score_one_pass", score_one_pass)
        for name, use_info_gain, steps in (("igpo", True, 2), ("grpo", False, 1)):
            c = smoke_config(tiny_model_dir, str(root / name), steps=steps)
            c.algorithm.use_info_gain = use_info_gain
            c.trainer.test_freq = 2 if use_info_gain else 0
            c.trainer.sample_freq = 1
            c.trainer.save_freq = 0
            c.trainer.use_tensorboard = False
            c.trainer.progress = False
            # room after the demo's few-shot prompt (~270 tokens, fed as a 512-wide power-of-two
            # block): in a 512-slot cache every episode would end at once with 'context'
            c.rollout.context_length = 1024
            events[name] = len(events["scores"])  # the first scoring call of this run
            train_lib.train(c)
            dirs[name] = str(root / name)
    return dirs, events, out.getvalue()


def test_a_steps_line_is_printed_before_the_next_step_starts(runs):
    _, events, stdout = runs
    igpo_training = [text for group_size, text in events["rollouts"] if group_size == 2][:2]
    assert len(igpo_training) == 2
    before_step_2 = igpo_training[1]
    lines = [line for line in before_step_2.splitlines() if line.startswith("step ")]
    assert len(lines) == 1 and lines[0].startswith("step 1 | reward/mean ")
    assert "actor/grad_norm" in lines[0]  # the update's (device) values are in it too
    assert any(line.startswith("step 2 | ") and "val/f1" in line for line in stdout.splitlines())


def test_sample_files_hold_every_field_and_agree_with_the_scoring(runs):
    dirs, events, _ = runs
    assert samples.sample_steps(dirs["igpo"]) == [1, 2]
    gains = []
    for step in (1, 2):
        records = samples.read_samples(dirs["igpo"], step)
        mean_logp_NT, valid_NT = events["scores"][events["igpo"] + step - 1]  # one scoring per IGPO step
        assert len(records) == mean_logp_NT.shape[0] == 4  # 2 questions × n = 2
        for i, r in enumerate(records):
            assert set(r) == FIELDS and r["step"] == step
            assert len(r["turn_records"]) == r["turns"] == len(r["p_gold"]) == len(r["info_gain"])
            assert all(set(t) == TURN_FIELDS for t in r["turn_records"])
            for t in range(r["turns"]):
                assert valid_NT[i, t]
                assert r["p_gold"][t] == pytest.approx(math.exp(mean_logp_NT[i, t]), rel=1e-6)
                assert r["turn_records"][t]["p_gold"] == r["p_gold"][t]
            for t in range(r["turns"] - 1):  # prob_diff: the gain of turn t is P_{t+1} - P_t
                # computed in float32 from P's of ~1e-5: a few ulps of P, far below the gains (~1e-8)
                ulps = 1e-6 * max(r["p_gold"][t], r["p_gold"][t + 1])
                assert r["info_gain"][t] == pytest.approx(r["p_gold"][t + 1] - r["p_gold"][t], rel=0, abs=ulps)
                gains.append(r["info_gain"][t])
            assert r["info_gain"][-1] is None  # the final turn earns the F1
            assert all(a is not None for a in r["advantage"])
    assert any(g != 0 for g in gains)  # the comparison above was not between zeros
    # GRPO never scores for its update, but its samples still carry P(gold)
    grpo = samples.read_samples(dirs["grpo"], 1)
    assert all(r["p_gold"] and all(p is not None and 0 < p <= 1 for p in r["p_gold"]) for r in grpo)


class _Page(HTMLParser):
    """The report's elements of interest, with the section each belongs to."""

    def __init__(self):
        super().__init__()
        self.figures, self.images, self.sections, self.episodes, self.turns = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = a.get("class", "").split()
        if tag == "figure" and "curves" in classes:
            self.figures.append(a)
        elif tag == "img":
            self.images.append(a)
        elif tag == "section" and "episodes" in classes:
            self.sections.append({**a, "episodes": []})
        elif tag == "details" and "episode" in classes:
            self.sections[-1]["episodes"].append({**a, "turns": []})
        elif tag == "div" and "turn" in classes:
            self.sections[-1]["episodes"][-1]["turns"].append(a)


def test_report_shows_both_runs_curves_and_the_chosen_steps_episodes(runs, tmp_path):
    dirs, _, _ = runs
    out = tmp_path / "report.html"
    report.main([dirs["igpo"], dirs["grpo"], "--out", str(out)])  # each run's latest samples: steps 2 and 1
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    (figure,) = page.figures
    assert figure["data-runs"].split(",") == ["igpo", "grpo"] and "reward/mean" in figure["data-keys"]
    src = next(img["src"] for img in page.images if "curves" in img.get("class", ""))
    assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert [s["data-run"] for s in page.sections] == ["igpo", "grpo"]
    for section, name, step in zip(page.sections, ("igpo", "grpo"), (2, 1)):
        records = samples.read_samples(dirs[name], step)
        assert section["data-step"] == str(step)
        assert int(section["data-count"]) == len(records) == len(section["episodes"])
        for episode, record in zip(section["episodes"], records):
            assert episode["data-finish"] == record["finish_reason"]
            assert [float(t["data-p-gold"]) for t in episode["turns"]] == pytest.approx(record["p_gold"], rel=1e-5)
    assert "http://" not in out.read_text() and "https://" not in out.read_text()  # nothing fetched
    report.main([dirs["igpo"], "--step", "1", "--out", str(tmp_path / "step1.html")])
    page = _Page()
    page.feed((tmp_path / "step1.html").read_text(encoding="utf-8"))
    assert [s["data-step"] for s in page.sections] == ["1"]
    with pytest.raises(SystemExit):  # a step without samples is an error naming the steps there are
        report.main([dirs["igpo"], "--step", "7", "--out", str(tmp_path / "x.html")])


def test_an_evaluate_output_directory_is_reported_too(tmp_path):
    from tests.html_test import episode

    records = [episode("answer", 1.0, [("<answer>Kel</answer>", [], "", 0.3, None)]),
               episode("max_turns", -2.0, [("<search>x</search>", ["x"], "r", 0.1, 0.05),
                                           ("<search>y</search>", ["y"], "", 0.15, None)])]
    samples.write_jsonl(str(tmp_path / "episodes.jsonl"), records)  # what igpo_jax.evaluate writes
    page = _Page()
    page.feed(report.build_report([str(tmp_path)]))
    (section,) = page.sections
    assert section["data-count"] == "2" and [len(e["turns"]) for e in section["episodes"]] == [1, 2]
    assert page.figures == []  # no metrics.jsonl: no curves, and no error either
