"""Live progress on the console: tqdm bars for a step's long phases, and lines that reach a log
file as they are printed.

    show = enabled(config.trainer.progress)
    with bar(num_rows, "rollout", show, unit="ep") as b: …b.update(1)…
    console_print("step 3 | reward/mean 0.25")

Quiet mode (tests, scripted sweeps): `trainer.progress=False` in the config, or the environment
variable IGPO_PROGRESS=0, which wins over the config. Bars go to stderr; metric lines go to stdout
through `tqdm.write`, which clears the bars first, so the two never interleave on one line.
When stdout is not a terminal (nohup, `> log`), Python buffers it in 8 KiB blocks: a step's line
would appear minutes late, so `line_buffered_stdout()` switches it to line buffering.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

PROGRESS_ENV = "IGPO_PROGRESS"
_OFF = ("0", "false", "no", "off")
# A log file gets a bar update at most this often (a terminal: tqdm's 0.1 s); every update is a
# line in the file, so a fast rate would bury the metric lines.
LOG_INTERVAL_S = 30.0


def enabled(requested: bool = True, primary: bool = True) -> bool:
    """Whether to draw bars: asked for, not switched off by IGPO_PROGRESS, and on the process
    that writes the run's files (the other hosts of a multi-host run stay quiet)."""
    if os.environ.get(PROGRESS_ENV, "").strip().lower() in _OFF:
        return False
    return bool(requested) and primary


def bar(total: int | None, desc: str, show: bool, unit: str = "it", leave: bool = False, initial: int = 0):
    """A tqdm bar on stderr (a disabled one, which costs nothing, when `show` is False)."""
    stream = sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, initial=initial, disable=not show, file=stream,
                dynamic_ncols=True, mininterval=0.1 if interactive else LOG_INTERVAL_S)


def console_print(line: str) -> None:
    """One metrics line on stdout, at once (bars are cleared and redrawn around it)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def line_buffered_stdout(stream=None) -> bool:
    """Line-buffer `stream` (default sys.stdout) when it is not a terminal; True when it changed.
    Streams without `reconfigure` (pytest's capture, StringIO) are left alone."""
    stream = sys.stdout if stream is None else stream
    if getattr(stream, "isatty", lambda: True)() or not hasattr(stream, "reconfigure"):
        return False
    stream.reconfigure(line_buffering=True)
    return True


def rollout_callback(b):
    """An `on_progress(turns, episodes)` for `episodes.rollout` that advances `b` by the
    episodes finished and shows the turns ended so far."""
    turns = [0]

    def on_progress(new_turns: int, new_episodes: int) -> None:
        turns[0] += new_turns
        b.set_postfix(turns=turns[0], refresh=False)
        b.update(new_episodes)

    return on_progress
