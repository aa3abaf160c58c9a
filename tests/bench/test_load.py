"""bench/load.py: how an engine to measure is named and where it runs from."""

from __future__ import annotations

from pathlib import Path

from bench.load import REPO, parse_engine


def test_the_same_policy_from_another_checkout_is_told_apart_from_this_ones(tmp_path: Path) -> None:
    other = tmp_path / "engine-before"
    here, there = parse_engine("fcfs"), parse_engine(f"fcfs:16@{other}")
    assert (here.label, here.repo, here.settings) == ("fcfs", REPO, {"scheduler": "fcfs"})
    assert (there.label, there.repo) == ("fcfs:16@engine-before", other.resolve())
    assert there.settings == {"scheduler": "fcfs", "tick_rows": "16"}
    old = parse_engine(f"old={other}")
    assert old.repo == other.resolve() and not old.multi_model and old.label not in (here.label, there.label)
