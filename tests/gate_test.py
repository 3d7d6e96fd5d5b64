"""bench.gate's statistics on hand-built groups: collapsed, IG-informative, the bridge query."""

import sys

import numpy as np
import pytest

from bench import gate
from bench.gate import bridge_counts, group_regime, names_bridge


def test_a_query_names_the_bridge_only_in_full():
    assert names_bridge("Pemdo Labs", "Pemdo Labs") and names_bridge(" pemdo  labs founded?", "Pemdo Labs")
    assert not names_bridge("Pemdo", "Pemdo Labs")  # half the name: the namesake may answer
    assert not names_bridge("Pemdo Laboratories", "Pemdo Labs") and not names_bridge("anything", "")


def test_groups_collapsed_by_outcome_and_those_whose_gains_still_differ():
    # three groups of two: 0 differs in outcome; 1 ties (0, 0) with gains 0.5 / 0.1; 2 ties with
    # gains 0.3 / 0.3005 (a spread under the tolerance, though the z-score makes it live)
    outcome = np.array([1.0, 0.0, 0.0, 0.0, -2.0, -2.0])
    live = np.array([True, True, True, True, True, True])
    ig = np.array([[0.2], [0.2], [0.5], [0.1], [0.3], [0.3005]])
    mask = np.ones((6, 1), bool)
    counts = group_regime(outcome, live, ig, mask, np.array([0, 0, 1, 1, 2, 2]), ig_tol=0.01)
    assert counts == {"groups": 3, "collapsed": 2, "informative": 2, "spread": 1}
    # two identical rollouts whose turn 1 gained 0.9 and turn 2 lost 1.0: the pooled z-score makes
    # their advantages live, but nothing tells one rollout from the other
    same = group_regime(np.zeros(2), np.ones(2, bool), np.array([[0.9, -1.0], [0.9, -1.0]]), np.ones((2, 2), bool),
                        np.zeros(2, int), ig_tol=0.01)
    assert same == {"groups": 1, "collapsed": 1, "informative": 1, "spread": 0}
    # one rollout searched once, the other twice: their gains differ where one has none
    apart = group_regime(np.zeros(2), np.ones(2, bool), np.array([[0.9, 0.0], [0.9, -1.0]]),
                         np.array([[True, False], [True, True]]), np.zeros(2, int), ig_tol=0.01)
    assert apart["spread"] == 1
    dead = group_regime(outcome, np.zeros(6, bool), ig, mask, np.array([0, 0, 1, 1, 2, 2]), ig_tol=0.01)
    assert dead["informative"] == 0


def test_the_second_query_is_counted_against_the_episodes_bridge():
    queries = [[("Ilsa Varn",), None, ("Pemdo Labs",), None],  # a second search, naming the bridge
               [("Ilsa Varn",), ("Pemdo",)],  # a second search, half the name
               [("Ilsa Varn",), None],  # answered after one search
               [("Osk Tamber",), ("Belmar College", "Hallum College")]]  # one of two queries names it
    counts = bridge_counts(queries, ["Pemdo Labs", "Pemdo Labs", "Pemdo Labs", "Hallum College"])
    assert counts == {"episodes": 4, "second_queries": 3, "bridge_queries": 2}


def test_a_checkpoint_that_is_not_there_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["gate", "--checkpoint", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--checkpoint: checkpoint directory not found"):
        gate.main()
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["gate", "--checkpoint", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="holds no finished checkpoint"):
        gate.main()
