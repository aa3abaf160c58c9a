"""bench/load.py: how an engine to measure is named and where it runs from."""

from __future__ import annotations

from pathlib import Path

from bench.load import REPO, parse_engine


def test_the_same_policy_from_another_checkout_is_told_apart_from_this_ones(tmp_path: Path) -> None:
    other = tmp_path / "engine-before"
    here, there = parse_engine("least-work"), parse_engine(f"least-work:16@{other}")
    assert (here.label, here.repo, here.settings) == ("least-work", REPO, {"scheduler": "least-work"})
    assert (there.label, there.repo) == ("least-work:16@engine-before", other.resolve())
    assert there.settings == {"scheduler": "least-work", "tick_rows": "16"}
    old = parse_engine(f"old={other}")
    assert old.repo == other.resolve() and not old.multi_model and old.label not in (here.label, there.label)
