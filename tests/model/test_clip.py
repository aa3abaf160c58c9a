"""CLIP scoring on a tiny open_clip model with random weights: loading, preprocessing, prompts, scores.

No test needs network access: the tiny architecture is registered locally and its weights are
either random (seeded) or a file the test writes.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.clip import (
    TINY_MODEL,
    Clip,
    ClipSpec,
    ClipUnavailable,
    clip_score,
    evaluate_clip,
    import_open_clip,
    load_clip,
    register_model_config,
    save_checkpoint,
    tiny_config,
)
from model.clip.loading import _cached_tag_file
from model.data import CLASS_NAMES

try:
    import_open_clip()
except ClipUnavailable as err:  # pragma: no cover - the dev extra installs it
    pytest.skip(f"open_clip not usable: {err}", allow_module_level=True)


def tiny_spec(**kw) -> ClipSpec:
    return ClipSpec(**{"model": TINY_MODEL, "pretrained": None, "random_init": True, **kw})


@pytest.fixture(scope="module")
def clip() -> Clip:
    return load_clip(tiny_spec())


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    # Six 28x28 "garments": bright blobs of different sizes on black, like Fashion-MNIST.
    yy, xx = np.mgrid[:28, :28]
    out = [(255 * ((yy - 14) ** 2 + (xx - 14) ** 2 < r * r)).astype(np.uint8) for r in (3, 5, 7, 9, 11, 13)]
    return np.stack(out)  # (6, 28, 28)


class NotAStateDict:
    pass


# ---- loading ------------------------------------------------------------------------------------------------------


def test_importing_model_clip_does_not_import_open_clip():
    code = "import sys, model.clip; assert 'open_clip' not in sys.modules, 'imported eagerly'"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, env={"PYTHONPATH": str(root)})


def test_tiny_model_loads_by_name_with_the_configured_architecture(clip):
    assert clip.image_size == 32 and clip.context_length == 77
    assert clip.model.visual.conv1.kernel_size == (8, 8)  # patch size from tiny_config
    assert clip.class_embeddings.shape == (10, tiny_config()["embed_dim"])
    assert clip.spec.describe() == f"{TINY_MODEL} (random weights)"


def test_random_weights_are_seeded_and_only_given_when_asked(clip, images):
    again = load_clip(tiny_spec())
    other = load_clip(tiny_spec(seed=1))
    texts = ["a dress"]
    np.testing.assert_array_equal(clip.score(images, texts), again.score(images, texts))
    assert not np.allclose(clip.score(images, texts), other.score(images, texts))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_clip(tiny_spec(seed=5))
    torch.testing.assert_close(torch.rand(3), expected)  # the caller's random stream is left alone
    with pytest.raises(ClipUnavailable, match="no weights configured") as err:
        load_clip(ClipSpec(model=TINY_MODEL, pretrained=None))
    assert "FASHION_" not in str(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_loading_from_a_local_file_reproduces_the_saved_model(tmp_path, images, suffix):
    saved = load_clip(tiny_spec(seed=7))
    path = tmp_path / f"clip{suffix}"
    if suffix == ".safetensors":
        save_checkpoint(saved.model, path)
    else:
        torch.save(saved.model.state_dict(), path)
    loaded = load_clip(ClipSpec(model=TINY_MODEL, pretrained="ignored-tag", checkpoint=path))
    assert loaded.spec.describe() == f"{TINY_MODEL} from {path}"
    texts = ["a photo of a bag", "a sneaker"]
    np.testing.assert_array_equal(loaded.score(images, texts), saved.score(images, texts))
    assert not np.allclose(loaded.score(images, texts), load_clip(tiny_spec()).score(images, texts))


def test_missing_checkpoint_is_unavailable_naming_the_file_and_the_field(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ClipUnavailable) as err:
        load_clip(ClipSpec(model=TINY_MODEL, checkpoint=missing))
    message = str(err.value)
    assert str(missing) in message and "not found (ClipSpec.checkpoint)" in message
    assert "FASHION_" not in message  # the service's settings are the service's to explain (app.clip_service)


def test_a_pickled_object_is_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": NotAStateDict()}, path)
    with pytest.raises(ClipUnavailable, match="could not load .*UnpicklingError"):
        load_clip(ClipSpec(model=TINY_MODEL, checkpoint=path))


def test_a_checkpoint_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "small.safetensors"
    register_model_config("fashion-clip-tiny-16", {**tiny_config(), "embed_dim": 16})
    save_checkpoint(load_clip(tiny_spec(model="fashion-clip-tiny-16")).model, path)
    with pytest.raises(ClipUnavailable, match="size mismatch"):
        load_clip(ClipSpec(model=TINY_MODEL, checkpoint=path))


def test_unknown_architecture_and_tag_are_named(tmp_path):
    with pytest.raises(ClipUnavailable, match="no architecture 'ViT-Nope'"):
        load_clip(ClipSpec(model="ViT-Nope", pretrained=None, random_init=True))
    with pytest.raises(ClipUnavailable, match="'nope' is not a pretrained tag of ViT-B-32.*laion2b_s34b_b79k"):
        load_clip(ClipSpec(model="ViT-B-32", pretrained="nope"))


def test_without_downloads_an_uncached_tag_fails_fast(tmp_path):
    with pytest.raises(ClipUnavailable, match="not in .* and downloads are off"):
        load_clip(ClipSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=tmp_path, download=False))


def test_a_cached_tag_file_is_found_in_the_hub_cache_layout(tmp_path):
    # huggingface_hub's layout: models--org--name/refs/main -> commit, snapshots/<commit>/<file>.
    repo = tmp_path / "models--laion--CLIP-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    weights = repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"x")
    assert _cached_tag_file({"hf_hub": "laion/CLIP-test/"}, tmp_path) == str(weights)
    safe = weights.with_name("open_clip_model.safetensors")
    safe.write_bytes(b"x")
    assert _cached_tag_file({"hf_hub": "laion/CLIP-test/"}, tmp_path) == str(safe)  # preferred, as open_clip does
    assert _cached_tag_file({"hf_hub": "laion/CLIP-other/"}, tmp_path) is None


def test_local_dir_with_its_own_config_loads_and_requires_weights(tmp_path, images):
    saved = load_clip(tiny_spec(seed=3))
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config(), "preprocess_cfg": {}}))
    with pytest.raises(ClipUnavailable, match="could not load"):
        load_clip(ClipSpec(model=f"local-dir:{folder}", pretrained=None))
    save_checkpoint(saved.model, folder / "open_clip_model.safetensors")
    loaded = load_clip(ClipSpec(model=f"local-dir:{folder}", pretrained=None))
    np.testing.assert_array_equal(loaded.score(images, ["a coat"]), saved.score(images, ["a coat"]))


def test_spec_rejects_templates_without_one_placeholder():
    with pytest.raises(ValueError, match="exactly one"):
        ClipSpec(templates=("a photo",))
    with pytest.raises(ValueError, match="exactly one"):
        ClipSpec(templates=())


# ---- preprocessing and tokens -------------------------------------------------------------------------------------


def test_preprocessing_turns_28x28_grayscale_into_normalised_rgb_at_the_model_size(clip):
    mean = np.array(clip.model.visual.preprocess_cfg["mean"])
    std = np.array(clip.model.visual.preprocess_cfg["std"])
    flat = np.full((2, 28, 28), 100, dtype=np.uint8)
    x = clip.preprocess_images(flat)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    expected = (100 / 255 - mean) / std  # a constant image stays constant under bicubic resizing
    np.testing.assert_allclose(x[0].mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(x.amax(dim=(2, 3)).numpy(), x.amin(dim=(2, 3)).numpy(), atol=1e-5)


def test_preprocessing_repeats_the_gray_channel_and_resizes_bicubic(clip, images):
    mean = torch.tensor(clip.model.visual.preprocess_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(clip.model.visual.preprocess_cfg["std"]).view(3, 1, 1)
    x = clip.preprocess_images(images[:1])[0] * std + mean  # back to [0, 1]
    np.testing.assert_allclose(x[0].numpy(), x[1].numpy(), atol=1e-6)
    np.testing.assert_allclose(x[0].numpy(), x[2].numpy(), atol=1e-6)
    upscaled = np.asarray(Image.fromarray(images[0]).resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    np.testing.assert_allclose(x[0].numpy(), upscaled, atol=1e-5)


def test_preprocessing_accepts_pil_and_lists_and_refuses_other_dtypes(clip, images):
    as_array = clip.preprocess_images(images)
    as_pil = clip.preprocess_images([Image.fromarray(im) for im in images])
    torch.testing.assert_close(as_array, as_pil)
    with pytest.raises(ValueError, match="uint8"):
        clip.preprocess_images(images.astype(np.float32))
    with pytest.raises(ValueError, match="no images"):
        clip.preprocess_images([])


def test_tokenisation_pads_to_the_context_with_start_and_end_tokens(clip):
    tokens = clip.tokenize(["a dress", "a photo of an ankle boot"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    sot, eot = clip.tokenizer.sot_token_id, clip.tokenizer.eot_token_id
    n = len(clip.tokenizer.encode("a dress"))
    assert tokens[0, 0] == sot and tokens[0, n + 1] == eot and (tokens[0, n + 2 :] == 0).all()
    assert clip.tokenizer.decode(tokens[0, 1 : n + 1].tolist()).strip() == "a dress"
    with pytest.raises(ValueError, match="at most 77"):
        clip.tokenize(["dress " * 100])
    with pytest.raises(ValueError, match="non-empty"):
        clip.tokenize([])


def test_prompts_follow_the_templates_and_class_names():
    spec = tiny_spec(templates=("a photo of a {}.", "a {} on black"))
    clip = load_clip(spec)
    assert clip.prompts("dress") == ["a photo of a dress.", "a dress on black"]
    assert clip.prompts(9) == ["a photo of a ankle boot.", "a ankle boot on black"]
    # Prompt ensembling: the class embedding is the renormalised mean of the unit template embeddings.
    emb = clip.encode_texts(clip.prompts(3))
    expected = emb.mean(0) / emb.mean(0).norm()
    torch.testing.assert_close(clip.class_embeddings[3], expected)


def test_a_class_name_picks_the_class_prompt(clip):
    assert clip.prompts("Ankle Boot") == clip.prompts(9)
    with pytest.raises(ValueError, match="must be an index 0..9 or a class name"):
        clip.prompts("hat")


# ---- scores -------------------------------------------------------------------------------------------------------


def test_score_is_a_cosine_matrix_of_unit_embeddings(clip, images):
    texts = ["a dress", "a bag", "a photo of a sneaker"]
    cos = clip.score(images, texts)
    assert cos.shape == (6, 3) and cos.dtype == np.float32
    assert np.all(cos >= -1) and np.all(cos <= 1)
    img, txt = clip.encode_images(images), clip.encode_texts(texts)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3))
    # Each entry depends on its own image and text only: batching and order do not change it.
    np.testing.assert_allclose(clip.score(images[::-1], texts[::-1]), cos[::-1, ::-1], atol=1e-5)
    np.testing.assert_allclose(clip.encode_images(images, batch_size=4).numpy(), img.numpy(), atol=1e-5)


def test_class_score_equals_the_score_against_the_class_prompt(clip, images):
    per_class = clip.score_class(images, "dress")
    np.testing.assert_allclose(per_class, clip.score(images, clip.prompts("dress"))[:, 0], atol=1e-5)


def test_clipscore_is_100_times_the_positive_part_of_the_cosine():
    np.testing.assert_allclose(clip_score(np.array([-0.5, 0.0, 0.27, 1.0])), [0.0, 0.0, 27.0, 100.0])
    assert float(clip_score(0.2625)) == pytest.approx(26.25)


def test_zero_shot_predicts_the_most_similar_class_prompt(clip, images):
    result = clip.zero_shot(images)
    assert result.labels.shape == (6,) and result.probs.shape == (6, 10)
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-5)
    cos = np.stack([clip.score_class(images, c) for c in range(10)], axis=1)  # (6, 10)
    np.testing.assert_array_equal(result.labels, cos.argmax(axis=1))
    # softmax(logit_scale * cos): probability ratios follow the cosine differences.
    scale = float(clip.model.logit_scale.detach().exp())
    ratio = np.log(result.probs[:, 1] / result.probs[:, 0])
    np.testing.assert_allclose(ratio, scale * (cos[:, 1] - cos[:, 0]), atol=1e-3)


def test_evaluate_clip_reports_per_class_similarity_and_zero_shot_accuracy(clip, images):
    generated = {3: images[:4], 5: images[2:]}
    real_labels = np.array([3, 3, 5, 7, 7, 7])
    report = evaluate_clip(clip, generated, images, real_labels, batch_size=4)
    assert set(report["per_class"]) == {CLASS_NAMES[3], CLASS_NAMES[5], CLASS_NAMES[7]}
    dress = report["per_class"]["dress"]
    assert dress["n_generated"] == 4 and dress["n_real"] == 2
    assert dress["generated_similarity"] == pytest.approx(float(clip.score_class(images[:4], 3).mean()), abs=1e-5)
    assert dress["real_similarity"] == pytest.approx(float(clip.score_class(images[:2], 3).mean()), abs=1e-5)
    acc = float((clip.zero_shot(images[:4]).labels == 3).mean())
    assert dress["generated_zero_shot_accuracy"] == pytest.approx(acc)
    sneaker = report["per_class"]["sneaker"]
    assert sneaker["n_generated"] == 0 and sneaker["generated_similarity"] is None and sneaker["n_real"] == 3
    sims = [report["per_class"][n]["real_similarity"] for n in ("dress", "sandal", "sneaker")]
    assert report["mean"]["real_similarity"] == pytest.approx(np.mean(sims))
    json.dumps(report)  # JSON-ready for the weights card
    with pytest.raises(ValueError, match="labels"):
        evaluate_clip(clip, generated, images, real_labels[:3])
