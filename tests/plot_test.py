"""plot: a PNG of two runs' curves; clear errors without matplotlib or for unknown keys."""

from __future__ import annotations

import json
import struct
import sys

import matplotlib  # a pinned requirement (requirements.txt): a broken install fails here, not skips
import pytest

from igpo_jax import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path, rewards, val_every=2):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for step, reward in enumerate(rewards, 1):
            record = {"step": step, "reward/mean": reward, "actor/pg_loss": None}
            if step % val_every == 0:
                record["val/f1"] = reward / 2
            f.write(json.dumps(record) + "\n")
    return str(path)


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_two_runs_on_one_png(tmp_path):
    igpo = write_run(tmp_path / "igpo", [0.1, 0.3, 0.5, 0.6])
    grpo = write_run(tmp_path / "grpo", [0.1, 0.2, 0.25, 0.3])
    out = tmp_path / "figs" / "curves.png"
    plot.main([igpo, grpo, "--out", str(out), "--keys", "reward/mean,val/f1"])
    assert png_size(out) == (2 * 450, 320)  # two subplots of 4.5 × 3.2 inches at 100 dpi
    # default keys: those with values (pg_loss is all null here, so it is left out)
    assert plot.plot_runs([igpo, grpo], str(tmp_path / "default.png")) == ["reward/mean", "val/f1"]
    assert png_size(tmp_path / "default.png")[0] > 0


def test_unknown_key_lists_the_available_ones(tmp_path):
    run = write_run(tmp_path / "run", [0.1, 0.2])
    with pytest.raises(ValueError, match="no values for reward/nope in these runs; available keys: "
                                         "actor/pg_loss, reward/mean, val/f1"):
        plot.plot_runs([run], str(tmp_path / "x.png"), keys=["reward/nope"])


def test_without_matplotlib_the_error_names_the_install_command(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", [0.1, 0.2])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError, match="plotting needs matplotlib, which is not installed: pip install matplotlib"):
        plot.plot_runs([run], str(tmp_path / "x.png"))
    with pytest.raises(SystemExit) as exit_info:
        plot.main([run, "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 1
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_labels_stay_distinct_for_repeated_directory_names():
    assert plot.run_labels(["runs/igpo/seed0", "runs/grpo/seed0"]) == ["igpo/seed0", "grpo/seed0"]
    assert plot.run_labels(["runs/igpo", "runs/grpo/"]) == ["igpo", "grpo"]


def test_arms_and_their_mean_curve():
    assert [plot.arm_of(x) for x in ("igpo_seed0", "grpo_seed12", "demo", "seed3")] == ["igpo", "grpo", "demo", "seed3"]
    steps, values = plot.mean_curve([([0, 4, 8], [0.0, 0.2, 0.4]), ([0, 4, 8, 12], [0.2, 0.4, 0.6, 0.9])])
    assert steps == [0, 4, 8]  # 12 is in one seed only
    assert values == pytest.approx([0.1, 0.3, 0.5])


def test_by_arm_draws_a_sweep_on_one_png(tmp_path, monkeypatch):
    runs = [write_run(tmp_path / f"{arm}_seed{seed}", [0.1 * seed, 0.2, 0.3, 0.5 if arm == "igpo" else 0.3])
            for arm in ("igpo", "grpo") for seed in range(3)]
    drawn = []
    import matplotlib.axes

    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(k.get("label")) or real(ax, *a, **k))
    plot.main([*runs, "--by_arm", "--out", str(tmp_path / "sweep.png"), "--keys", "reward/mean"])
    assert png_size(tmp_path / "sweep.png") == (450, 320)
    # per arm: three unlabelled seed lines, then the labelled mean
    assert drawn == [None, None, None, "igpo (mean of 3)", None, None, None, "grpo (mean of 3)"]
