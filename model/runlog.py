"""What a training run shows and keeps as it goes: its metrics file (one JSON object a line) and
printed lines (``Log``), and its progress bar (``progress_bar``). Used by ``model.train``,
``model.distill`` and ``model.trajectories``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0, unit: str = "step") -> tqdm:
    """A tqdm bar on stderr; redrawn at most once a minute where stderr is a log file, not a terminal."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        unit=unit,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 60,
    )


class Log:
    """The run's metrics file (one JSON object a line) and its printed lines. Only the main rank writes:
    every other rank's Log (``enabled=False``) is silent."""

    def __init__(self, path: Path, enabled: bool = True):
        self.enabled = enabled
        self.file = path.open("a") if enabled else None

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file:
            self.file.close()

    def row(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def say(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)
