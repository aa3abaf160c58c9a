"""Evaluation: the Frechet distance against closed forms, the classifier, and the whole pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.classifier import Classifier, ClassifierConfig, load_classifier, predict, random_shift, train_classifier
from model.clip import TINY_MODEL, ClipSpec
from model.evaluate import EvalConfig, evaluate, generate, main, write_card
from model.io import WeightsError, card_sampling, load_weights, save_weights, save_weights_file
from model.report import format_table
from model.unet import UNet, perturbed_unet, tiny_config


def test_classifier_roundtrip_and_missing_file(tmp_path):
    model = Classifier(ClassifierConfig(widths=(8, 16, 32))).eval()
    path = tmp_path / "clf.safetensors"
    save_weights_file(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"config": {"widths": [8, 16, 32]}}))
    loaded = load_classifier(path)
    x = torch.randn(5, 1, 28, 28)
    probs, feats = predict(loaded, x)
    assert probs.shape == (5, 10) and feats.shape == (5, 32)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, predict(model, x)[0], rtol=1e-5)
    with pytest.raises(WeightsError, match="nope.safetensors"):
        load_classifier(tmp_path / "nope.safetensors")


def test_random_shift_moves_each_image_by_its_own_offset_over_background():
    torch.manual_seed(0)
    x = torch.full((64, 1, 28, 28), -1.0)
    x[:, 0, 10:18, 24:28] = torch.linspace(0, 1, 64).view(64, 1, 1)  # a block against the right edge
    shifted = random_shift(x, max_shift=2)
    offsets = set()
    for level, after in zip(torch.linspace(0, 1, 64), shifted[:, 0], strict=True):
        rows, cols = torch.nonzero(after > -1, as_tuple=True)
        dy, dx = int(rows.min()) - 10, int(cols.min()) - 24
        assert max(abs(dy), abs(dx)) <= 2
        # The block moved whole; what leaves the frame is gone and nothing wraps around.
        expected = torch.full((28, 28), -1.0)
        expected[10 + dy : 18 + dy, 24 + dx : 28 + dx] = level
        assert torch.equal(after, expected)
        offsets.add((dy, dx))
    assert len(offsets) > 10  # per image, not one shift for the batch


def test_classifier_learns_from_a_small_subset(tmp_path, fashion_mnist_dir):
    card = train_classifier(
        str(fashion_mnist_dir),
        tmp_path / "clf.safetensors",
        ClassifierConfig(widths=(8, 16, 32)),
        epochs=2,
        train_limit=5_000,
        progress=False,
    )
    # Chance is 0.10; two epochs on 5,000 images reach well above it.
    assert card["accuracy"]["test"] > 0.5
    assert (tmp_path / "clf.json").exists() and not list(tmp_path.glob("*.part"))


def tiny_models(tmp_path: Path) -> tuple[Path, Path]:
    """An untrained tiny U-Net and classifier, saved with their cards: (weights, classifier)."""
    unet = UNet(tiny_config())
    card = {
        "name": "tiny",
        "unet": unet.config.to_dict(),
        "diffusion": {"schedule": "cosine", "T": 1000, "prediction": "v"},
    }
    weights = tmp_path / "tiny.safetensors"
    save_weights(unet, card, weights)
    clf = tmp_path / "clf.safetensors"
    save_weights_file(Classifier(ClassifierConfig(widths=(8, 16, 32))).state_dict(), clf)
    clf.with_suffix(".json").write_text(json.dumps({"config": {"widths": [8, 16, 32]}}))
    return weights, clf


def test_evaluate_end_to_end_with_tiny_models(tmp_path, fashion_mnist_dir):
    weights, clf = tiny_models(tmp_path)

    clip = ClipSpec(model=TINY_MODEL, pretrained=None, random_init=True)
    r = evaluate(
        EvalConfig(weights, clf, str(fashion_mnist_dir), per_class=3, steps=2, guidance=1.5, batch_size=16, clip=clip)
    )
    assert r["per_class"] == 3 and len(r["accuracy_per_class"]) == 10
    # Every class has the same number of samples, so the overall accuracy is the mean of the classes'.
    assert r["accuracy"] == pytest.approx(np.mean(list(r["accuracy_per_class"].values())))
    # Real training images sit much closer to the test set than noise from an untrained network.
    assert r["frechet_distance_real_train"] < r["frechet_distance"]
    # CLIP figures per class, for the samples and for as many real test images of the class.
    assert len(r["clip"]["per_class"]) == 10
    assert all(row["n_generated"] == 3 and row["n_real"] == 3 for row in r["clip"]["per_class"].values())
    assert -1.0 <= r["clip"]["mean"]["generated_similarity"] <= 1.0
    table = format_table(r)
    assert "Frechet distance" in table and "0-shot gen" in table
    # Which way the samples are off (tests/model/test_metrics.py checks the measures; an untrained judge
    # says little), and every class's own distance: real images of a class closer than noise.
    pr = r["precision_recall"]
    assert all(0.0 <= pr[k] <= 1.0 for k in ("precision", "recall", "precision_real_train", "recall_real_train"))
    assert "precision, recall (k=3) of the samples" in table
    per_class = r["frechet_distance_per_class"]
    assert list(per_class) == list(r["accuracy_per_class"])
    distances = [(c["frechet_distance"], c["frechet_distance_real_train"]) for c in per_class.values()]
    assert len(set(distances)) == 10 and all(np.isfinite(distances).all(1))  # each class its own
    assert np.mean([real for _, real in distances]) < np.mean([fake for fake, _ in distances])

    # Against the validation split: its own reference and floor, from the held-out training images.
    v = evaluate(
        EvalConfig(
            weights,
            clf,
            str(fashion_mnist_dir),
            per_class=3,
            steps=2,
            guidance=1.5,
            batch_size=16,
            reference="val",
            val_size=40,
        )
    )
    assert v["reference"] == "val (40 held-out training images)" and "samples vs val" in format_table(v)
    assert "guidance 1.5, float32  (" in format_table(v)
    assert v["frechet_distance"] != r["frechet_distance"]
    assert v["frechet_distance_real_train"] != r["frechet_distance_real_train"]
    assert v["accuracy"] == r["accuracy"]  # the same samples
    with pytest.raises(ValueError, match="reference must be one of test, val"):
        evaluate(EvalConfig(weights, clf, str(fashion_mnist_dir), per_class=1, steps=1, reference="train"))

    written = json.loads(write_card(weights, r).read_text())
    assert written["quality"]["accuracy"] == r["accuracy"]
    assert written["quality"]["clip"]["per_class"] == r["clip"]["per_class"]
    assert written["sampling"] == {
        "sampler": "dpm++",
        "steps": 2,
        "guidance": 1.5,
        "guidance_interval": None,
        "guidance_method": "classifier-free",
    }


def test_write_card_sets_the_measured_default_and_keeps_the_rest_of_the_sampling_section(tmp_path):
    weights, _ = tiny_models(tmp_path)
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["sampling"] = {"sampler": "heun", "steps": 18, "guidance": 1.35, "guide": "guide", "sigma_min": 0.09}
    card_path.write_text(json.dumps(card))
    save_weights(UNet(tiny_config()), {**card, "name": "guide"}, tmp_path / "guide.safetensors")
    measured = {"sampler": "dpm++", "steps": 20, "guidance": 1.5, "guidance_interval": [0.3, 5.0], "guide": None}

    # Classifier-free: the card's guide stays there for requests that ask for autoguidance, and Heun's level.
    sampling = json.loads(write_card(weights, measured).read_text())["sampling"]
    assert sampling == {
        "sampler": "dpm++",
        "steps": 20,
        "guidance": 1.5,
        "guidance_interval": [0.3, 5.0],
        "guide": "guide",
        "sigma_min": 0.09,
        "guidance_method": "classifier-free",
    }
    assert card_sampling(json.loads(card_path.read_text())).guide == "guide"
    # Autoguided, at a Heun level of its own: both become the default.
    sampling = json.loads(write_card(weights, {**measured, "guide": "guide", "sigma_min": 0.05}).read_text())[
        "sampling"
    ]
    assert (sampling["guidance_method"], sampling["guide"], sampling["sigma_min"]) == ("autoguidance", "guide", 0.05)
    # What no card can say is refused, and the card is left as it was.
    before = card_path.read_text()
    with pytest.raises(ValueError, match="not combined"):
        write_card(weights, {**measured, "guide": "guide", "guide_weight": 1.5})
    with pytest.raises(ValueError, match="only a guide beside the weights"):
        write_card(weights, {**measured, "guide": "elsewhere"})
    assert card_path.read_text() == before


def test_evaluate_cli_takes_a_guidance_interval_and_keeps_it_in_the_card(tmp_path, capsys, fashion_mnist_dir):
    weights, clf = tiny_models(tmp_path)
    common = [
        "--weights",
        str(weights),
        "--classifier",
        str(clf),
        "--data-dir",
        str(fashion_mnist_dir),
        "--per-class",
        "2",
    ]
    common += ["--json", str(tmp_path / "r.json")]
    written = ["--sampler", "ddim", "--steps", "3", "--guidance", "2", "--guidance-interval", "0.5", "5"]

    assert main([*common, *written, "--write-card"]) == 0
    assert "ddim 3 steps, guidance 2.0 for 0.5 < sigma <= 5" in capsys.readouterr().out
    assert json.loads(weights.with_suffix(".json").read_text())["sampling"]["guidance_interval"] == [0.5, 5.0]
    # Without flags the card's sampling section is re-measured; 'all' guides every step.
    main(common)
    result = json.loads((tmp_path / "r.json").read_text())[0]
    assert (result["sampler"], result["steps"], result["guidance"]) == ("ddim", 3, 2.0)
    assert result["guidance_interval"] == [0.5, 5.0]
    main([*common, "--guidance-interval", "all"])
    assert json.loads((tmp_path / "r.json").read_text())[0]["guidance_interval"] is None
    with pytest.raises(SystemExit):
        main([*common, "--guidance-interval", "5", "0.5"])
    assert "--guidance-interval needs 0 <= SIGMA_LO < SIGMA_HI" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--weights", str(tmp_path / "missing.safetensors")])
    assert "missing.json: card not found" in capsys.readouterr().err


def test_generate_runs_the_network_in_the_precision_asked_for(tmp_path):
    weights, _ = tiny_models(tmp_path)
    net = perturbed_unet(tiny_config())  # an untrained U-Net outputs zeros, in any precision
    save_weights(net, json.loads(weights.with_suffix(".json").read_text()), weights)
    loaded = load_weights(weights)
    full, labels = generate(loaded, 1, "dpm++", 3, 1.5, 16)
    half, same_labels = generate(loaded, 1, "dpm++", 3, 1.5, 16, precision="bfloat16")
    assert full.dtype == half.dtype == np.uint8 and (labels == same_labels).all()
    assert not np.array_equal(full, half)  # bfloat16 rounds the network's output
    assert np.abs(full.astype(int) - half.astype(int)).mean() < 8  # ... a little
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, float16"):
        evaluate(EvalConfig(weights, tmp_path / "none", per_class=1, steps=1, precision="int8"))


def test_evaluate_cli_measures_a_student_beside_the_teacher(tmp_path, capsys, fashion_mnist_dir):
    weights, clf = tiny_models(tmp_path)
    card = json.loads(weights.with_suffix(".json").read_text())
    student = tmp_path / "student.safetensors"
    student_card = {**card, "name": "student", "sampling": {"sampler": "consistency", "steps": 2, "guidance": 1.0}}
    save_weights(perturbed_unet(tiny_config(), seed=1), student_card, student)
    common = ["--weights", str(weights), "--classifier", str(clf), "--data-dir", str(fashion_mnist_dir)]
    common += ["--per-class", "2", "--steps", "3", "--guidance", "2", "--student", str(student)]
    common += ["--student-steps", "1", "2", "--json", str(tmp_path / "r.json"), "--write-card"]
    assert main(common) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "r.json").read_text())
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in results] == [
        ("dpm++", 3, 2.0),
        ("consistency", 1, 1.0),  # the student's card: its sampler, and no guidance (distilled in)
        ("consistency", 2, 1.0),
    ]
    assert results[1]["frechet_distance_real_train"] == results[0]["frechet_distance_real_train"]  # one floor
    table = out[out.index("| model |") :].splitlines()
    assert table[2].startswith("| tiny | dpm++ | 3 | 6 | 2 |") and "| 1.00x |" in table[2]
    assert table[3].startswith("| student | consistency | 1 | 1 | 1 |")
    ratio = results[2]["frechet_distance"] / results[0]["frechet_distance"]
    assert table[4].startswith("| student | consistency | 2 | 2 | 1 |") and f"| {ratio:.2f}x |" in table[4]
    # --write-card: the student's card gets the result at its own steps.
    assert json.loads(student.with_suffix(".json").read_text())["quality"]["steps"] == 2


def test_evaluate_cli_measures_earlier_weights_beside_at_their_own_cards_sampling(tmp_path, capsys, fashion_mnist_dir):
    """--baseline: earlier weights in the same run (same seeds, one floor), each at its card's sampling,
    while the flags (--guidance here) apply to --weights only; --write-card writes --weights' card."""
    weights, clf = tiny_models(tmp_path)
    card = json.loads(weights.with_suffix(".json").read_text())
    earlier = tmp_path / "earlier.safetensors"
    their = {"sampler": "ddim", "steps": 2, "guidance": 1.5}
    save_weights(perturbed_unet(tiny_config(), seed=1), {**card, "name": "earlier", "sampling": their}, earlier)
    common = ["--weights", str(weights), "--classifier", str(clf), "--data-dir", str(fashion_mnist_dir)]
    common += ["--per-class", "2", "--steps", "3", "--guidance", "2", "--baseline", str(earlier)]
    assert main([*common, "--json", str(tmp_path / "r.json"), "--write-card"]) == 0
    out = capsys.readouterr().out
    mine, theirs = json.loads((tmp_path / "r.json").read_text())
    assert (mine["sampler"], mine["steps"], mine["guidance"]) == ("dpm++", 3, 2.0)
    assert (theirs["sampler"], theirs["steps"], theirs["guidance"]) == ("ddim", 2, 1.5)
    assert theirs["frechet_distance_real_train"] == mine["frechet_distance_real_train"]
    assert "| earlier | ddim | 2 | 4 | 1.5 |" in out
    assert json.loads(weights.with_suffix(".json").read_text())["quality"]["guidance"] == 2.0
    assert "quality" not in json.loads(earlier.with_suffix(".json").read_text())
    with pytest.raises(SystemExit):
        main([*common[:-1], str(tmp_path / "missing.safetensors")])


def test_evaluate_cli_screens_heuns_lowest_noise_level(tmp_path, capsys, fashion_mnist_dir):
    weights, clf = tiny_models(tmp_path)
    common = ["--weights", str(weights), "--classifier", str(clf), "--data-dir", str(fashion_mnist_dir)]
    common += ["--per-class", "2", "--steps", "2", "--guidance", "1", "--json", str(tmp_path / "r.json")]
    assert main([*common, "--sampler", "heun", "--sigma-min", "0.05", "0.5"]) == 0
    low, high = json.loads((tmp_path / "r.json").read_text())
    assert (low["sigma_min"], high["sigma_min"]) == (0.05, 0.5)
    assert low["frechet_distance"] != high["frechet_distance"]  # other levels, other samples
    out = capsys.readouterr().out
    assert "heun 2 steps to sigma 0.05, guidance 1.0" in out and "| tiny | heun to sigma 0.05 | 2 | 4 | 1 |" in out
    with pytest.raises(SystemExit):  # only Heun has a lowest level to set
        main([*common, "--sampler", "ddim", "--sigma-min", "0.05"])


def test_evaluate_cli_autoguides_with_the_guides_it_is_given_or_its_cards(tmp_path, capsys, fashion_mnist_dir):
    weights, clf = tiny_models(tmp_path)
    card = json.loads(weights.with_suffix(".json").read_text())
    save_weights(perturbed_unet(tiny_config(), seed=0), card, weights)
    guide = tmp_path / "guide.safetensors"
    save_weights(perturbed_unet(tiny_config(), seed=1), {**card, "name": "guide"}, guide)
    common = ["--weights", str(weights), "--classifier", str(clf), "--data-dir", str(fashion_mnist_dir)]
    common += ["--per-class", "2", "--steps", "3", "--guidance", "2", "--json", str(tmp_path / "r.json")]

    assert main([*common, "--guide", str(guide), "none", "--write-card"]) == 0
    out = capsys.readouterr().out
    auto, cfg = json.loads((tmp_path / "r.json").read_text())
    assert (auto["guide"], cfg["guide"]) == ("guide", None)
    assert auto["frechet_distance"] != cfg["frechet_distance"]  # a different reference, other samples
    assert "guidance 2.0, autoguided by guide, float32" in out
    assert "| tiny | dpm++ | 3 | 6 | 2 |" in out and "| tiny | dpm++ | 3 | 6 | 2, autoguided by guide |" in out
    # --write-card stored the last run (classifier-free); a card that names a guide is autoguided by default.
    assert "guide" not in json.loads(weights.with_suffix(".json").read_text())["sampling"]
    save_weights(perturbed_unet(tiny_config(), seed=0), {**card, "sampling": {"guide": "guide"}}, weights)
    assert main(common) == 0
    assert json.loads((tmp_path / "r.json").read_text())[0]["frechet_distance"] == auto["frechet_distance"]

    # Combined guidance: classifier-free at --guidance plus the guide at each --guide-weight, 3 evaluations a step.
    assert main([*common, "--guide", str(guide), "--guide-weight", "1.5"]) == 0
    (both,) = json.loads((tmp_path / "r.json").read_text())
    assert both["guide_weight"] == 1.5
    assert both["frechet_distance"] not in (auto["frechet_distance"], cfg["frechet_distance"])
    assert "guidance 2.0 plus guide at 1.5, float32" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # nothing to combine with
        main([*common, "--guide", "none", "--guide-weight", "1.5"])
    with pytest.raises(SystemExit):  # a card's default is one kind of guidance, checked before any run
        main([*common, "--guide", str(guide), "--guide-weight", "1.5", "--write-card"])
    assert "cannot be combined guidance" in capsys.readouterr().err

    # A guide must be a model of the same diffusion: its outputs are compared with the main network's.
    save_weights(
        perturbed_unet(tiny_config()), {**card, "diffusion": {**card["diffusion"], "prediction": "eps"}}, guide
    )
    with pytest.raises(WeightsError, match="guide's diffusion"):
        main(common)
