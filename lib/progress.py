"""Progress a user can see: tqdm bars in JupyterLab; under the runner (`make`), text lines on the stage's stderr,
which the terminal shows and the shared HTML report hides."""
from __future__ import annotations

import os
import sys
from typing import Iterable

TERMINAL_ENV = "CODEX_FORGE_TERMINAL"  # set by the runner for the kernels it starts
REDRAW_SECONDS = 5.0  # a text bar or training line at most this often
HEARTBEAT_SECONDS = 9.0  # the runner says the stage is alive after this long without a line (a line every <10 s)


def on_terminal() -> bool:
    """True inside a stage the runner executes (its output streams reach the terminal)."""
    return os.environ.get(TERMINAL_ENV) == "1"


def bar(iterable: Iterable | None = None, **kwargs):
    """A tqdm bar: the notebook widget in JupyterLab; under the runner a text bar on stderr, redrawn every few seconds."""
    if on_terminal():
        from tqdm.std import tqdm

        return tqdm(iterable, file=sys.stderr, mininterval=REDRAW_SECONDS, ascii=True, ncols=100, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def note(message: str) -> None:
    """One progress line on stderr: on the terminal under the runner, hidden in the report."""
    print(message, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 12s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
