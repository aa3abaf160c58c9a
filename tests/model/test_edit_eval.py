"""model/edit_eval.py: its masks, its metrics' wiring, its resuming and its command line, on tiny random
networks, an untrained judge and a small stand-in for Fashion-MNIST (the numbers mean nothing; where they
come from is what is checked)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model import edit_eval
from model.classifier import Classifier, ClassifierConfig, load_classifier, predict
from model.data import NUM_CLASSES, FashionMNIST, to_model_range
from model.edit_eval import (
    MASKS,
    EditEvalConfig,
    Inpainter,
    brush,
    decode,
    floors,
    inpainters,
    mean_abs,
    measure,
    parse_repaint,
    score,
)
from model.editing import RePaint
from model.io import save_weights_file
from model.metrics import frechet_distance
from testkit.weights import STUDENT_CARD, tiny_weights


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny networks gain nothing from a second one on a busy two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_data(per_class: int = 5) -> FashionMNIST:
    """Random images, ``per_class`` test and training images of every class."""
    rng = np.random.default_rng(0)
    n = per_class * NUM_CLASSES
    labels = np.arange(n) % NUM_CLASSES
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return FashionMNIST(images, labels.astype(np.int64), images.copy(), labels.astype(np.int64))


def tiny_setup(root: Path) -> EditEvalConfig:
    """A tiny teacher (dpm++ 4 steps, guidance 2), a tiny student (consistency 4, guidance 1), an untrained
    judge, and a config that measures them on one image of each class."""
    teacher = tiny_weights(root / "teacher.safetensors", steps=4)
    student = tiny_weights(root / "student.safetensors", seed=1, **STUDENT_CARD)
    clf = root / "clf.safetensors"
    save_weights_file(Classifier(ClassifierConfig(widths=(8, 16, 32))).state_dict(), clf)
    clf.with_suffix(".json").write_text(json.dumps({"config": {"widths": [8, 16, 32]}}))
    return EditEvalConfig(
        teacher=str(teacher),
        student=str(student),
        classifier=str(clf),
        per_class=1,
        inpaint_per_class=1,
        strengths=(0.2, 0.5, 1.0),
        inpaint_steps=4,
        repaints=("2x2",),
        speed_batch=2,
        speed_repeats=1,
        batch_size=8,
        precision="float32",
        out=str(root / "out" / "edit_eval.json"),
        figures="",
    )


def test_the_fixed_masks_cover_their_named_region():
    box, left, top = (MASKS[name].draw(3, 0) for name in ("box", "left", "top"))
    assert box.shape == left.shape == top.shape == (3, 28, 28) and box.dtype == bool
    assert box[0].sum() == 14 * 14 and box[:, 7:21, 7:21].all()  # centred 14x14
    assert left.mean() == top.mean() == 0.5
    assert left[:, :, :14].all() and not left[:, :, 14:].any()
    assert top[:, :14].all() and not top[:, 14:].any()


def test_brush_strokes_are_seeded_per_image_and_cover_part_of_it():
    a, again, other_seed = brush(20, 0), brush(20, 0), brush(20, 1)
    assert np.array_equal(a, again)
    assert not np.array_equal(a, other_seed)
    assert len({m.tobytes() for m in a}) == 20  # each image its own strokes
    area = a.mean(axis=(1, 2))
    assert (area > 0.03).all() and (area < 0.7).all()  # never empty, never the whole image
    assert 0.1 < area.mean() < 0.4
    # image i's strokes depend on (seed, i) alone, not on how many are drawn
    assert np.array_equal(brush(3, 0), a[:3])


def test_repaint_settings_parse_and_the_methods_cost_what_editing_counts():
    assert parse_repaint("2x3") == RePaint(2, 3)
    with pytest.raises(ValueError, match="JUMPxRESAMPLINGS"):
        parse_repaint("2,3")
    methods = inpainters({"teacher": ("dpm++", 20), "student": ("consistency", 4)}, 20, ("2x3", "5x5"))
    assert list(methods) == [
        "teacher, dpm++ 20, replacement",
        "teacher, ddim 20 eta 1, replacement",
        "teacher, ddim 20, RePaint j=2 r=3",
        "teacher, ddim 20, RePaint j=5 r=5",
        "student, consistency 4 (alg. 4)",
    ]
    assert methods["teacher, ddim 20 eta 1, replacement"] == Inpainter("teacher", "ddim", 20, eta=1.0)
    assert "student" not in " ".join(inpainters({"teacher": ("dpm++", 20)}, 20, ()))


def test_an_identity_edit_is_perfectly_faithful_and_scores_the_floor(tmp_path):
    cfg = tiny_setup(tmp_path)
    classifier = load_classifier(cfg.classifier)

    def judge(images):
        return predict(classifier, to_model_range(images))

    data = small_data()
    inputs, labels = data.test_images[:10], data.test_labels[:10]
    pool, pool_labels = data.test_images[10:], data.test_labels[10:]
    ref = judge(pool)[1]
    identity = {"images": inputs.copy(), "evaluations": 0, "rows": 0, "seconds": 0.0}
    cell = score(identity, inputs, labels, judge, ref, np.arange(3))
    floor = floors(judge, inputs, labels, pool, pool_labels, ref, np.random.default_rng(0))
    assert cell["faithfulness"] == 0.0
    assert cell["frechet_distance"] == floor["identity"]
    assert cell["accuracy"] == floor["judge_accuracy"]
    assert np.array_equal(decode(cell["examples"]), inputs[:3])
    # An edit that changed the images is measured as changed, and the distance is taken in the judge's features.
    inverted = {**identity, "images": 255 - inputs}
    changed = score(inverted, inputs, labels, judge, ref, np.arange(3))
    assert changed["faithfulness"] == pytest.approx(np.abs(255 - 2 * inputs.astype(float)).mean())
    assert changed["frechet_distance"] == frechet_distance(judge(255 - inputs)[1], ref)
    # uint8 differences do not wrap around
    assert mean_abs(np.zeros((1, 28, 28), np.uint8), np.full((1, 28, 28), 255, np.uint8)) == 255.0


def test_a_distance_to_same_moments_is_the_distance_to_the_set():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 3.0
    proxy = edit_eval.same_moments(ref)
    assert proxy.shape == (12, 6)
    sample = rng.normal(size=(40, 6))
    assert frechet_distance(sample, proxy) == pytest.approx(frechet_distance(sample, ref), rel=1e-9)


def test_measure_counts_the_evaluations_keeps_the_pixels_and_resumes(tmp_path, monkeypatch):
    cfg = tiny_setup(tmp_path)
    r = measure(cfg, log=lambda line: None, data=small_data())
    teacher, student = r["variations"]["teacher"], r["variations"]["student"]
    # dpm++ 4 steps at strength 0.5 keeps 2 steps, each a guided (two-row) evaluation; the student's 0.2 keeps none
    assert (teacher["0.5"]["evaluations"], teacher["0.5"]["rows"]) == (2, 4)
    assert (student["0.5"]["evaluations"], student["0.5"]["rows"]) == (2, 2)
    assert "skipped" in student["0.2"] and "skipped" in teacher["0.2"]
    assert teacher["0.5"]["faithfulness"] > 0 and 0 <= teacher["1"]["accuracy"] <= 1
    cells = r["inpainting"]["left"]
    # RePaint j=2, r=2 on 4 ddim steps: one stretch of 2 levels denoised twice (model.editing counts it)
    assert cells["teacher, ddim 4, RePaint j=2 r=2"]["evaluations"] == 6
    assert cells["student, consistency 4 (alg. 4)"]["evaluations"] == 4
    assert all(c["kept_exact"] for mask in r["inpainting"].values() for c in mask.values())
    assert r["masks"]["top"]["area"] == 0.5
    # every method against the replacement RePaint runs on, with its paired interval around the difference
    versus, baseline = r["comparisons"]["box"], "teacher, ddim 4 eta 1, replacement"
    assert baseline not in versus and len(versus) == len(r["inpainting"]["box"]) - 1
    for c in versus.values():
        assert c["fd"]["interval"][0] <= c["fd"]["interval"][1] and -1 <= c["accuracy"]["difference"] <= 1
    # the error in the mask is the whole image's (the kept pixels are exact) over the mask's area
    a, b = r["inpainting"]["box"]["teacher, dpm++ 4, replacement"], r["inpainting"]["box"][baseline]
    expected = (a["faithfulness"] - b["faithfulness"]) / 0.25
    assert versus["teacher, dpm++ 4, replacement"]["mask_error"]["difference"] == pytest.approx(expected)
    assert "against teacher, ddim 4 eta 1, replacement" in edit_eval.format_tables(r)
    stored = np.load(Path(cfg.out).with_suffix(".npz"))
    assert np.array_equal(
        decode(cells["teacher, ddim 4, RePaint j=2 r=2"]["examples"]),
        stored["inpainting/left/teacher, ddim 4, RePaint j=2 r=2"][[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]],
    )
    speed = r["speed"]["teacher"]
    assert speed["generation"]["evaluation_ratio"] == 1.0 and speed["0.5"]["evaluation_ratio"] == 0.5
    assert json.loads(Path(cfg.out).read_text())["variations"] == r["variations"]

    # A rerun with the same settings measures nothing again; another seed starts over.
    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(edit_eval, "edit", refuse)
    assert measure(cfg, log=lambda line: None, data=small_data())["inpainting"] == r["inpainting"]
    with pytest.raises(AssertionError, match="measured again"):
        measure(replace(cfg, seed=1), log=lambda line: None, data=small_data())


def test_cli_writes_its_json_tables_and_pictures(tmp_path, capsys, fashion_mnist_dir):
    cfg = tiny_setup(tmp_path)
    out, figures = Path(cfg.out), tmp_path / "figures"
    args = ["--teacher", cfg.teacher, "--student", "", "--classifier", cfg.classifier, "--data-dir"]
    args += [str(fashion_mnist_dir), "--per-class", "1", "--inpaint-per-class", "1", "--strengths", "1.0"]
    args += ["--masks", "brush", "--repaints", "--sections", "variations", "inpainting", "--precision", "float32"]
    assert edit_eval.main([*args, "--out", str(out), "--figures", str(figures)]) == 0
    r = json.loads(out.read_text())
    assert list(r["variations"]) == ["teacher"] and list(r["inpainting"]["brush"]) == [
        "teacher, dpm++ 4, replacement",
        "teacher, ddim 20 eta 1, replacement",
    ]
    assert r["floors"]["variations"]["images"] == 10 and "speed" not in r
    printed = capsys.readouterr().out
    assert "| teacher | 1 | 4 | 8 |" in printed and "brush strokes" in printed
    assert out.with_suffix(".md").read_text() in printed
    assert (figures / "edit_variations.png").stat().st_size > 0 and (figures / "edit_inpainting.png").exists()
    with pytest.raises(SystemExit):
        edit_eval.main([*args, "--out", str(out), "--figures", "", "--masks", "star"])
    assert "unknown masks or sections ['star']" in capsys.readouterr().err
