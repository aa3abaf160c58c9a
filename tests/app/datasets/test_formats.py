"""Exported datasets, each read back by the tool its users read it with: Fashion-MNIST's IDX loader,
NumPy, Hugging Face ``datasets``; the card's checksums; the same bytes on every export; the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from app.datasets.__main__ import main
from app.datasets.formats import CARD, NPZ, PARQUET, export
from app.datasets.store import ChunkError, ChunkStore
from model.data import CLASS_NAMES, FILES, FashionMNIST, read_idx

pytestmark = pytest.mark.timeout(120)


def test_idx_files_are_read_by_the_fashion_mnist_loader_in_place_of_the_real_ones(exported, drawn, tmp_path):
    out, _ = exported
    images, labels = drawn.arrays()
    data_dir = tmp_path / "fashion-mnist"
    data_dir.mkdir()
    for key in ("train_images", "train_labels"):
        shutil.copy(out / FILES[key], data_dir / FILES[key])
    for part in ("images", "labels"):  # the loader wants a test split too: the same files stand in
        shutil.copy(out / FILES[f"train_{part}"], data_dir / FILES[f"test_{part}"])

    data = FashionMNIST.load(data_dir, check_counts=False)
    assert np.array_equal(data.train_images, images) and np.array_equal(data.train_labels, labels)
    assert np.array_equal(read_idx(out / FILES["train_images"], 2051), images)
    for key in ("train_images", "train_labels"):
        header = (out / FILES[key]).read_bytes()[:10]
        assert header[3] == 0, "no FNAME or other optional gzip fields"
        assert header[4:8] == bytes(4), "gzip mtime 0"


def test_npz_holds_x_and_y_as_numpy_reads_them(exported, drawn):
    out, _ = exported
    images, labels = drawn.arrays()
    with np.load(out / NPZ) as z:
        assert sorted(z.files) == ["x", "y"]
        assert z["x"].dtype == np.uint8 and z["x"].shape == (drawn.spec.total, 28, 28)
        assert z["y"].dtype == np.int64
        assert np.array_equal(z["x"], images) and np.array_equal(z["y"], labels)


def test_parquet_loads_in_hugging_face_datasets_as_an_image_and_a_class_label(exported, drawn, tmp_path):
    datasets = pytest.importorskip("datasets")
    out, _ = exported
    images, labels = drawn.arrays()
    ds = datasets.load_dataset(
        "parquet", data_files=str(out / PARQUET), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == list(CLASS_NAMES)
    assert len(ds) == drawn.spec.total
    rows = list(ds)
    assert all(isinstance(row["image"], Image.Image) and row["image"].mode == "L" for row in rows)
    assert np.array_equal(np.stack([np.asarray(row["image"]) for row in rows]), images)
    assert [row["label"] for row in rows] == labels.tolist()
    assert ds.features["label"].int2str(int(labels[-1])) == "ankle boot"


def test_the_card_names_the_spec_the_model_and_every_file_with_its_sha256(exported, drawn, app_weights):
    out, card = exported
    assert json.loads((out / CARD).read_text()) == card
    assert set(card["files"]) == {FILES["train_images"], FILES["train_labels"], NPZ, PARQUET}
    for name, facts in card["files"].items():
        data = (out / name).read_bytes()
        assert facts["sha256"] == hashlib.sha256(data).hexdigest() and facts["bytes"] == len(data), name
    assert card["images"] == drawn.spec.total == 20
    assert card["spec"] == drawn.spec.to_json()
    assert card["counts"] == dict.fromkeys(CLASS_NAMES, 2)
    assert card["model"]["name"] == "tiny-test"
    assert card["model"]["weights"]["sha256"] == hashlib.sha256(app_weights.read_bytes()).hexdigest()
    assert "seed + i" in card["seed_rule"]
    assert card["code_version"] is None or isinstance(card["code_version"], str)


def test_two_exports_of_one_dataset_are_byte_identical(exported, drawn, tmp_path):
    out, card = exported
    again = export(drawn, tmp_path / "again")
    assert again["files"] == card["files"]
    for name in card["files"]:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


def test_an_incomplete_dataset_or_an_unknown_format_is_refused(drawn, copy_store, tmp_path):
    with pytest.raises(ValueError, match="formats must be one or more of idx, npz, parquet; got \\['csv'\\]"):
        export(drawn, tmp_path / "csv", ["csv"])
    store = copy_store(drawn)
    lines = (store.root / "chunks.jsonl").read_text().splitlines()
    (store.root / "chunks.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ChunkError, match="3 of 4 chunks"):
        export(ChunkStore(store.root, store.spec, store.size), tmp_path / "partial")
    assert not (tmp_path / "partial" / CARD).exists()


def test_the_cli_draws_and_exports_and_exports_a_drawn_directory(app_weights, drawn, tmp_path, capsys):
    spec = drawn.spec
    args = ["--weights", str(app_weights), "--out", str(tmp_path / "ds"), "--per-class", "2"]
    args += ["--seed", str(spec.seed), "--chunk-size", str(drawn.size), "--device", "cpu", "--precision", "float32"]
    assert main(["draw", *args, "--export", str(tmp_path / "all")]) == 0
    cli_store = ChunkStore(tmp_path / "ds", spec, drawn.size)
    assert [cli_store.path(i).read_bytes() for i in range(4)] == [drawn.path(i).read_bytes() for i in range(4)]
    card = json.loads((tmp_path / "all" / CARD).read_text())
    assert card["model"]["weights"]["sha256"] == hashlib.sha256(app_weights.read_bytes()).hexdigest()
    assert card["drawn_on"][0]["precision"] == "float32"
    assert len(card["files"]) == 4

    assert main(["export", "--from", str(tmp_path / "ds"), "--out", str(tmp_path / "npz"), "--format", "npz"]) == 0
    assert sorted(p.name for p in (tmp_path / "npz").iterdir()) == [CARD, NPZ]
    assert (tmp_path / "npz" / NPZ).read_bytes() == (tmp_path / "all" / NPZ).read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "holds no dataset" in capsys.readouterr().err
