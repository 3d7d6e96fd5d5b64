"""reporting.progress: quiet mode, line buffering of a non-terminal stdout, the rollout callback."""

from __future__ import annotations

import io

from igpo_jax.reporting import progress


def test_quiet_by_config_env_or_on_other_hosts(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    assert progress.enabled(True) and not progress.enabled(False)
    assert not progress.enabled(True, primary=False)  # only the process writing the files draws bars
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv(progress.PROGRESS_ENV, off)
        assert not progress.enabled(True)
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    assert progress.enabled(True)


def test_a_log_file_gets_each_line_when_it_is_printed():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8")  # like stdout redirected to a file: block-buffered
    stream.write("step 1 | reward/mean 0.5\n")
    assert raw.getvalue() == b""  # still in the 8 KiB buffer: `nohup` logs would show nothing
    assert progress.line_buffered_stdout(stream)
    stream.write("step 2 | reward/mean 0.7\n")
    assert raw.getvalue() == b"step 1 | reward/mean 0.5\nstep 2 | reward/mean 0.7\n"
    assert not progress.line_buffered_stdout(io.StringIO())  # nothing to reconfigure: left alone


def test_rollout_callback_counts_episodes_and_turns():
    with progress.bar(4, "rollout", show=True, unit="ep") as b:
        b.fp = io.StringIO()  # keep the drawing out of the test output
        on_progress = progress.rollout_callback(b)
        on_progress(3, 0)
        on_progress(2, 2)
        on_progress(0, 1)  # an episode that ran out of context without a turn
        assert b.n == 3 and b.postfix == "turns=5"
    with progress.bar(4, "quiet", show=False) as b:
        progress.rollout_callback(b)(1, 1)  # a disabled bar takes updates and draws nothing
