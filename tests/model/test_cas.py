"""Classification Accuracy Score: a synthetic set that is the real data scores exactly 1, one with
shuffled labels far below; finished trainings are not trained again; the summary's arithmetic by hand."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import model.cas as cas
from model.cas import CASConfig, TrainingSet, head, load_synthetic, main, summarize
from model.data import CLASS_NAMES, FashionMNIST

LIMIT = 1000  # real images per training set: one epoch on them reaches ~0.5 test accuracy, chance is 0.1
TINY = ["--widths", "8", "16", "32", "--epochs", "1", "--batch-size", "32", "--lr", "0.01", "--threads", "1"]


def cli_args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--data-dir",
        str(data_dir),
        "--run-dir",
        str(root / "run"),
        "--out",
        str(root / "cas.json"),
        "--seeds",
        "2",
        "--limit",
        str(LIMIT),
        "--no-augmented",
        "--no-progress",
        "--synthetic",
        f"same={root / 'same.npz'}",
        "--synthetic",
        f"shuffled={root / 'shuffled.npz'}",
        *TINY,
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fashion_mnist_dir) -> tuple[Path, Path, str]:
    """(root, data dir, printed table) of one CLI run: real, ``same`` (the real training images the run
    uses, as an npz) and ``shuffled`` (them with permuted labels), 2 seeds each."""
    root = tmp_path_factory.mktemp("cas")
    data = FashionMNIST.load(fashion_mnist_dir)
    x, y = head(data.train_images, data.train_labels, LIMIT)
    np.savez(root / "same.npz", x=x, y=y)
    np.savez(root / "shuffled.npz", x=x, y=np.random.default_rng(0).permutation(y))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(cli_args(fashion_mnist_dir, root, "--per-class-table")) == 0
    return root, fashion_mnist_dir, printed.getvalue()


def test_the_real_data_as_a_synthetic_set_scores_exactly_one(finished):
    root, _, _ = finished
    sets = json.loads((root / "cas.json").read_text())["training_sets"]
    # Same images, labels and seed: CPU training is deterministic, so every seed's accuracy is equal.
    assert sets["same"]["accuracy"]["per_seed"] == sets["real"]["accuracy"]["per_seed"]
    assert sets["real"]["accuracy"]["min"] > 0.3  # it learned something, so the ratio means something
    summary = json.loads((root / "cas.json").read_text())["synthetic"]["same"]
    assert summary["cas"] == 1.0
    assert all(r == 1.0 for r in summary["per_class_ratio"].values() if r is not None)


def test_shuffled_labels_score_far_below_one(finished):
    root, _, _ = finished
    summary = json.loads((root / "cas.json").read_text())
    assert summary["synthetic"]["shuffled"]["cas"] < 0.5
    assert summary["training_sets"]["shuffled"]["accuracy"]["max"] < 0.25  # about chance (0.1)


def test_cli_prints_the_table_and_writes_the_json_and_the_picture(finished):
    root, _, printed = finished
    summary = json.loads((root / "cas.json").read_text())
    assert list(summary["training_sets"]) == ["real", "same", "shuffled"]
    real = summary["training_sets"]["real"]
    assert real["train_images"] == LIMIT and real["seeds"] == [0, 1] and real["cpu_minutes"] > 0
    assert set(real["per_class_accuracy"]) == set(CLASS_NAMES)
    assert summary["synthetic"]["same"]["augmentation"] is None  # --no-augmented
    assert summary["machine"] in printed
    assert f"| real | {LIMIT:,} |" in printed and "| same |" in printed and "| shuffled |" in printed
    assert "| ankle boot |" in printed  # --per-class-table
    assert not list(root.glob(".*.part"))
    png = root / "cas.png"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["plot", str(root / "cas.json"), str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_trains_only_what_is_missing(finished, tmp_path, monkeypatch):
    root, data_dir, _ = finished
    for name in ("same.npz", "shuffled.npz", "run"):
        (shutil.copytree if name == "run" else shutil.copy)(root / name, tmp_path / name)
    trained: list[int] = []
    fit = cas.fit_classifier
    monkeypatch.setattr(cas, "fit_classifier", lambda *a, **k: trained.append(1) or fit(*a, **k))
    results = tmp_path / "run" / "results.jsonl"
    lines = results.read_text().splitlines()
    assert len(lines) == 6

    with contextlib.redirect_stdout(io.StringIO()):
        main(cli_args(data_dir, tmp_path))
    assert trained == [] and results.read_text().splitlines() == lines

    # A kill while the last result was being written leaves half a line: it is trained again, alone.
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    with contextlib.redirect_stdout(io.StringIO()):
        main(cli_args(data_dir, tmp_path))
    assert trained == [1]
    again = results.read_text().splitlines()
    assert again[:-1] == lines[:-1] and json.loads(again[-1])["accuracy"] == json.loads(lines[-1])["accuracy"]
    rerun, first = (json.loads((r / "cas.json").read_text()) for r in (tmp_path, root))
    assert rerun["synthetic"] == first["synthetic"]  # the summary is built from the file, old lines and new


def test_a_run_directory_of_other_settings_is_refused(finished, tmp_path, capsys):
    root, data_dir, _ = finished
    for name in ("same.npz", "shuffled.npz", "run"):
        (shutil.copytree if name == "run" else shutil.copy)(root / name, tmp_path / name)
    with pytest.raises(SystemExit):
        main([*cli_args(data_dir, tmp_path), "--epochs", "2"])
    assert "other data or settings" in capsys.readouterr().err


def test_summary_pairs_seeds_worked_by_hand():
    """real 0.80 0.82 0.84 (std 0.02); NAME 0.40 0.41 0.42; real+NAME 0.83 0.84 0.88: differences
    0.03 0.02 0.04, mean 0.03 and std 0.01, which beats real's seed spread of 0.02."""
    x, y = np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int64)
    sets = [
        TrainingSet("real", "real", x, y, None),
        TrainingSet("gen", "synthetic", x, y, "gen.npz"),
        TrainingSet("real+gen", "real+synthetic", x, y, "gen.npz"),
    ]
    accuracy = {"real": [0.80, 0.82, 0.84], "gen": [0.40, 0.41, 0.42], "real+gen": [0.83, 0.84, 0.88]}
    records = [
        {
            "set": name,
            "seed": seed,
            "accuracy": acc,
            "per_class_accuracy": [0.0 if name == "real" else 0.5] + [acc] * 9,
            "train_images": 1,
            "cpu_seconds": 30.0,
            "machine": "test",
        }
        for name, accs in accuracy.items()
        for seed, acc in enumerate(accs)
    ]
    summary = summarize(records, sets, CASConfig(seeds=3))
    gen = summary["synthetic"]["gen"]
    assert gen["cas"] == pytest.approx(0.41 / 0.82)
    assert gen["cas_per_seed"]["min"] == pytest.approx(0.42 / 0.84)
    assert gen["per_class_ratio"]["t-shirt/top"] is None  # real got none of the class right
    assert gen["per_class_ratio"]["trouser"] == pytest.approx(0.41 / 0.82)
    aug = gen["augmentation"]
    assert aug["mean"] == pytest.approx(0.03) and aug["std"] == pytest.approx(0.01)
    assert aug["min"] == pytest.approx(0.02) and aug["max"] == pytest.approx(0.04)
    assert aug["real_seed_std"] == pytest.approx(0.02) and aug["beats_seed_spread"] is True
    assert summary["training_sets"]["real"]["cpu_minutes"] == 1.5
    assert summary["training_sets"]["real"]["accuracy"]["std"] == pytest.approx(0.02)


def test_limit_takes_the_first_images_class_by_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    images = np.arange(6, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    x, y = head(images, labels, 4)
    assert y.tolist() == [0, 0, 1, 2] and x[:, 0, 0].tolist() == [0, 1, 3, 5]
    assert head(images, labels, None)[1] is labels


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 28, 28), np.float32), "y": np.zeros(2, np.int64)}, "x must be uint8"),
        ({"x": np.zeros((2, 28, 28), np.uint8), "y": np.array([0, 10])}, r"labels must lie in 0\.\.9"),
        ({"x": np.zeros((2, 28, 28), np.uint8), "y": np.zeros(3, np.int64)}, "y must be 2 integer labels"),
        ({"images": np.zeros((2, 28, 28), np.uint8)}, "needs arrays 'x'"),
    ],
)
def test_a_malformed_synthetic_set_is_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_synthetic(tmp_path / "bad.npz")
