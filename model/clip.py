"""CLIP scoring with open_clip: loading, preprocessing of 28x28 grayscale images, prompts, similarity.

CLIP (Radford et al. 2021) embeds images and texts in one space; the cosine between the two
embeddings says how well a text describes an image. CLIPScore (Hessel et al. 2021) reports
``100 * max(cos, 0)``. Zero-shot classification compares an image with one prompt per class
and takes a softmax over ``logit_scale * cos``; several prompt templates per class are averaged
in embedding space, as in CLIP's zero-shot recipe (paper section 3.1.4).

Weights come from one of (settings the service reads in parentheses):
- an open_clip architecture name plus a pretrained tag, downloaded once into a cache directory
  (FASHION_CLIP_MODEL, FASHION_CLIP_PRETRAINED, FASHION_CLIP_CACHE_DIR);
- a local state-dict file for that architecture, .safetensors or a torch file read with
  ``weights_only=True`` (FASHION_CLIP_CHECKPOINT; it wins over the tag);
- random weights, only when asked for explicitly (tests, offline smoke runs).
When none can be had, ``load_clip`` raises ``ClipUnavailable`` with a message that says how.

open_clip is imported lazily, so the rest of ``model`` works without the ``clip`` extra.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.data import CLASS_NAMES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEFAULT_TEMPLATES = ("a photo of a {}, a type of clothing.",)
TINY_MODEL = "fashion-clip-tiny"  # registered with open_clip on first use; random weights unless a checkpoint

HOWTO = (
    "Provide CLIP weights in one of two ways: FASHION_CLIP_MODEL (an open_clip architecture, e.g. ViT-B-32) "
    "with FASHION_CLIP_PRETRAINED (a pretrained tag, e.g. laion2b_s34b_b79k), downloaded once into "
    "FASHION_CLIP_CACHE_DIR on a host with internet access (or copied there from one); or "
    "FASHION_CLIP_CHECKPOINT, a local .safetensors/.pt state dict for the architecture named by "
    "FASHION_CLIP_MODEL. On a host without internet, FASHION_CLIP_DOWNLOAD=false fails fast instead of retrying. "
    "CLIP needs the clip extra: pip install 'fashion-diffusion[clip]'."
)


class ClipUnavailable(RuntimeError):
    """No usable CLIP model: open_clip missing, weights not found or not downloadable, unknown name."""

    def __init__(self, problem: str):
        super().__init__(f"CLIP is unavailable: {problem.rstrip('. ')}. {HOWTO}")
        self.problem = problem


def tiny_config(image_size: int = 32) -> dict[str, Any]:
    """A small open_clip architecture (about 0.2M parameters outside the token table) for tests and smoke runs."""
    return {
        "embed_dim": 32,  # joint embedding width
        "vision_cfg": {
            "image_size": image_size,  # pixels; 28x28 inputs are resized to this
            "layers": 2,
            "width": 64,
            "head_width": 32,  # -> 2 attention heads
            "patch_size": 8,  # pixels per patch side: (32 / 8)^2 = 16 patches
        },
        "text_cfg": {
            "context_length": 77,  # tokens, as the stock tokenizer pads to
            "vocab_size": 49408,  # the stock BPE vocabulary
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }


def import_open_clip():
    """Import open_clip, or raise ClipUnavailable saying how to install it."""
    try:
        import open_clip
    except ImportError as err:
        raise ClipUnavailable(f"open_clip is not installed ({err})") from err
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        # A torchvision wheel built for another torch (e.g. PyPI's CUDA torchvision beside a CPU torch) cannot
        # load its C ops, and its import then fails registering fake kernels for two of them (pytorch/pytorch
        # #122494, pytorch/vision#8985). open_clip uses only torchvision's Python transforms, so declaring the
        # two schemas lets the import finish; the detection ops stay unusable, and open_clip never calls them.
        _declare_torchvision_schemas()
        import open_clip
    return open_clip


_TORCHVISION_LIB: list = []  # keeps the Library alive: dropping it would remove the declared schemas


def _declare_torchvision_schemas() -> None:
    if _TORCHVISION_LIB:
        return
    log.warning("torchvision's C ops do not load (torch/torchvision builds differ); declaring nms/qnms schemas")
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.append(lib)


def register_model_config(name: str, config: Mapping[str, Any]) -> None:
    """Make an architecture config known to open_clip under ``name`` (through its public add_model_config)."""
    open_clip = import_open_clip()
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"an open_clip config needs embed_dim, vision_cfg and text_cfg; got {sorted(config)}")
    if open_clip.get_model_config(name) == dict(config):
        return
    # add_model_config reads JSON files; the registry keeps the parsed config after the file is gone.
    with tempfile.TemporaryDirectory(prefix="clip-config-") as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


@dataclass(frozen=True)
class ClipSpec:
    """What to load. ``checkpoint`` wins over ``pretrained``; neither means random weights if ``random_init``."""

    model: str = DEFAULT_MODEL  # open_clip architecture name (also 'local-dir:/path' with its own config)
    pretrained: str | None = DEFAULT_PRETRAINED  # open_clip pretrained tag for ``model``
    checkpoint: Path | None = None  # local state dict (.safetensors, or .pt/.bin read with weights_only)
    cache_dir: Path | None = None  # where tags are downloaded to and looked up; None: huggingface_hub's default
    download: bool = True  # False: use only what is already in cache_dir, never touch the network
    random_init: bool = False  # allow random weights when neither pretrained nor checkpoint is given
    seed: int = 0  # for random weights
    device: str = "cpu"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # prompt templates with one "{}" for the class name
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self):
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(f"templates must be a non-empty list of strings with exactly one '{{}}': {self.templates}")
        if not self.class_names:
            raise ValueError("class_names must not be empty")

    def describe(self) -> str:
        if self.checkpoint is not None:
            return f"{self.model} from {self.checkpoint}"
        if self.model.startswith(("local-dir:", "hf-hub:")):
            return self.model
        if self.pretrained:
            return f"{self.model} ({self.pretrained})"
        return f"{self.model} (random weights)"


def load_clip(spec: ClipSpec) -> Clip:
    """Build the model, its tokenizer and preprocessing from ``spec``; ClipUnavailable when it cannot."""
    open_clip = import_open_clip()
    if spec.model == TINY_MODEL:
        register_model_config(TINY_MODEL, tiny_config())
    if not spec.model.startswith(("local-dir:", "hf-hub:")) and spec.model not in open_clip.list_models():
        raise ClipUnavailable(
            f"open_clip knows no architecture {spec.model!r} (FASHION_CLIP_MODEL); "
            f"known ones include {', '.join(open_clip.list_models()[:8])}, ..."
        )
    kwargs: dict[str, Any] = {"device": spec.device, "weights_only": True}
    if spec.cache_dir is not None:
        kwargs["cache_dir"] = str(spec.cache_dir)
    if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
        raise ClipUnavailable(f"checkpoint {spec.checkpoint} not found (FASHION_CLIP_CHECKPOINT)")
    schema = spec.model.startswith(("local-dir:", "hf-hub:"))  # config (and weights) come from there
    if spec.checkpoint is None and not spec.pretrained and not schema and not spec.random_init:
        raise ClipUnavailable(f"no weights configured for {spec.model} (neither a pretrained tag nor a checkpoint)")
    try:
        # Every path initialises a network before loading into it: keep that off the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            if spec.checkpoint is not None:
                model = open_clip.create_model(spec.model, pretrained=str(spec.checkpoint), **kwargs)
            elif spec.pretrained and not schema:
                model = _create_from_tag(open_clip, spec, kwargs)
            elif schema:
                model = open_clip.create_model(spec.model, require_pretrained=not spec.random_init, **kwargs)
            else:
                model = open_clip.create_model(spec.model, pretrained=None, **kwargs)
        tokenizer = open_clip.get_tokenizer(
            spec.model, **({"cache_dir": kwargs["cache_dir"]} if spec.cache_dir else {})
        )
    except ClipUnavailable:
        raise
    except Exception as err:  # open_clip reports download, format and shape problems as assorted errors
        raise ClipUnavailable(f"could not load {spec.describe()}: {type(err).__name__}: {err}") from err
    pp = model.visual.preprocess_cfg
    preprocess = open_clip.image_transform(
        pp["size"],
        is_train=False,
        mean=pp["mean"],
        std=pp["std"],
        resize_mode=pp["resize_mode"],
        interpolation=pp["interpolation"],
        fill_color=pp["fill_color"],
    )
    return Clip(spec, model.eval(), tokenizer, preprocess)


def _create_from_tag(open_clip, spec: ClipSpec, kwargs: dict[str, Any]) -> torch.nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
    if not tag_cfg:
        raise ClipUnavailable(
            f"{spec.pretrained!r} is not a pretrained tag of {spec.model} (FASHION_CLIP_PRETRAINED); "
            f"its tags: {', '.join(tags) or 'none'}"
        )
    cached = _cached_tag_file(tag_cfg, spec.cache_dir)
    if cached is not None:
        # Load the cached file by path: open_clip would first ask the hub for a newer revision, which on a
        # host without network costs a minute of retries. The tag's own preprocessing still applies.
        pp_keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
        force_pp = {k: tag_cfg[k] for k in pp_keys if k in tag_cfg}
        return open_clip.create_model(spec.model, pretrained=cached, force_preprocess_cfg=force_pp, **kwargs)
    if not spec.download:
        where = spec.cache_dir or "huggingface_hub's default cache"
        raise ClipUnavailable(f"{spec.describe()} is not in {where} and downloads are off (FASHION_CLIP_DOWNLOAD)")
    return open_clip.create_model(spec.model, pretrained=spec.pretrained, **kwargs)


def _cached_tag_file(tag_cfg: Mapping[str, Any], cache_dir: Path | None) -> str | None:
    """The tag's weights file if the hub cache already holds it (mirrors open_clip's download_pretrained)."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id, filename = hub.rstrip("/"), None
    if not hub.endswith("/"):
        repo_id, filename = hub.rsplit("/", 1)
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename and filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    for name in names:
        path = try_to_load_from_cache(repo_id, name, cache_dir=str(cache_dir) if cache_dir else None)
        if isinstance(path, str):
            return path
    return None


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model``'s state dict as safetensors (atomically), loadable with ClipSpec(checkpoint=path)."""
    from safetensors.torch import save

    from model.io import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(path), save(tensors, metadata={"format": "pt"}))
    return Path(path)


def resolve_class(value: int | str, class_names: Sequence[str] = CLASS_NAMES) -> int:
    """A class index, or a class name (case and spaces/underscores/hyphens ignored), as an index."""
    allowed = f"allowed: 0-{len(class_names) - 1} or one of {', '.join(class_names)}"
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(class_names):
            return value
        raise ValueError(f"class index {value} out of range; {allowed}")

    def key(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())

    keys = [key(n) for n in class_names]
    if isinstance(value, str) and key(value) in keys:
        return keys.index(key(value))
    raise ValueError(f"unknown class {value!r}; {allowed}")


def clip_score(cos: np.ndarray | float) -> np.ndarray:
    """CLIPScore convention (Hessel et al. 2021 with w = 100): 100 * max(cos, 0)."""
    return 100.0 * np.maximum(np.asarray(cos, dtype=np.float64), 0.0)


@dataclass(frozen=True)
class ZeroShot:
    labels: np.ndarray  # (N,) int64, predicted class index
    probs: np.ndarray  # (N, C) float32, softmax over the class prompts


@dataclass(eq=False)
class Clip:
    """A loaded CLIP model with its tokenizer and preprocessing. Read-only after construction: safe to share."""

    spec: ClipSpec
    model: Any  # open_clip's CLIP or CustomTextCLIP (an nn.Module)
    tokenizer: Any
    preprocess: Any  # open_clip's eval transform: PIL image -> (3, S, S) normalised tensor
    class_embeddings: torch.Tensor = field(init=False)  # (C, D) unit vectors, templates averaged

    def __post_init__(self):
        self.device = torch.device(self.spec.device)
        self.class_embeddings = torch.stack([self._class_embedding(c) for c in range(len(self.spec.class_names))])

    @property
    def image_size(self) -> int:
        size = self.model.visual.preprocess_cfg["size"]
        return size if isinstance(size, int) else size[0]

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ---- inputs -------------------------------------------------------------------------------------------------

    def prompts(self, class_: int | str) -> list[str]:
        """The prompts for a class, one per template."""
        name = self.spec.class_names[resolve_class(class_, self.spec.class_names)]
        return [t.format(name) for t in self.spec.templates]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> token ids (T, context_length); a text longer than the context is an error, not truncated."""
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:  # the stock BPE tokenizer; others truncate as their model was trained
            for i, text in enumerate(texts):
                n = len(encode(text)) + 2  # + start and end tokens
                if n > self.context_length:
                    raise ValueError(f"text {i} is {n} tokens long; at most {self.context_length} fit")
        return self.tokenizer(texts)

    def preprocess_images(self, images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
        """uint8 (N, H, W) / (N, H, W, 3) arrays, or a list of arrays or PIL images -> (N, 3, S, S) float32.

        Grayscale becomes RGB by repeating the channel, then the model's own transform resizes (bicubic,
        shortest side, centre crop) and normalises with its mean and std.
        """
        pils = [_to_pil(img, i) for i, img in enumerate(_as_list(images))]
        return torch.stack([self.preprocess(p) for p in pils])  # (N, 3, S, S)

    # ---- embeddings ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, images, batch_size: int = 256) -> torch.Tensor:
        """Unit image embeddings (N, D), float32 on the CPU."""
        items = _as_list(images)
        out = []
        for start in range(0, len(items), batch_size):
            x = self.preprocess_images(items[start : start + batch_size]).to(self.device)  # (B, 3, S, S)
            out.append(self.model.encode_image(x, normalize=True).float().cpu())  # (B, D)
        return torch.cat(out)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings (T, D), float32 on the CPU."""
        tokens = self.tokenize(texts).to(self.device)  # (T, L)
        return self.model.encode_text(tokens, normalize=True).float().cpu()  # (T, D)

    def _class_embedding(self, c: int) -> torch.Tensor:
        # CLIP's prompt ensembling: mean of the unit template embeddings, renormalised.
        return F.normalize(self.encode_texts(self.prompts(c)).mean(0), dim=0)  # (D,)

    # ---- scores -------------------------------------------------------------------------------------------------

    def score(self, images, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of every image with every text: (N_images, N_texts) float32 in [-1, 1]."""
        return (self.encode_images(images) @ self.encode_texts(texts).T).numpy()

    def score_class(self, images, class_: int | str) -> np.ndarray:
        """Cosine of each image with the class prompt (templates averaged): (N,) float32."""
        c = resolve_class(class_, self.spec.class_names)
        return (self.encode_images(images) @ self.class_embeddings[c]).numpy()

    @torch.inference_mode()
    def zero_shot(self, images, batch_size: int = 256) -> ZeroShot:
        """Zero-shot classification over the class prompts."""
        return self._zero_shot(self.encode_images(images, batch_size))

    def _zero_shot(self, emb: torch.Tensor) -> ZeroShot:
        logit_scale = self.model.logit_scale.detach().float().cpu().exp()
        logits = logit_scale * emb @ self.class_embeddings.T  # (N, C)
        probs = logits.softmax(dim=-1)
        return ZeroShot(labels=probs.argmax(-1).numpy().astype(np.int64), probs=probs.numpy())


def evaluate_clip(
    clip: Clip,
    generated: Mapping[int, np.ndarray],
    real_images: np.ndarray,
    real_labels: np.ndarray,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Per class: mean cosine with the class prompt and zero-shot accuracy, for generated and real images.

    ``generated`` maps a class index to its uint8 (n, 28, 28) samples; the real test images are the
    reference point (CLIP has never been trained on 28x28 grayscale, so absolute values mean little).
    Returns a JSON-ready dict: {"model", "templates", "per_class": {name: {...}}, "mean": {...}}.
    """
    real_labels = np.asarray(real_labels)
    if len(real_images) != len(real_labels):
        raise ValueError(f"{len(real_images)} real images but {len(real_labels)} labels")
    names = clip.spec.class_names
    per_class: dict[str, dict[str, float | int | None]] = {}
    for c, name in enumerate(names):
        row: dict[str, float | int | None] = {}
        sources = {"generated": generated.get(c), "real": real_images[real_labels == c]}
        for source, images in sources.items():
            if images is None or len(images) == 0:
                row.update({f"{source}_similarity": None, f"{source}_zero_shot_accuracy": None, f"n_{source}": 0})
                continue
            emb = clip.encode_images(images, batch_size)  # (n, D)
            row[f"{source}_similarity"] = float((emb @ clip.class_embeddings[c]).mean())
            row[f"{source}_zero_shot_accuracy"] = float((clip._zero_shot(emb).labels == c).mean())
            row[f"n_{source}"] = len(images)
        if row["n_generated"] or row["n_real"]:
            per_class[name] = row
    keys = ("generated_similarity", "real_similarity", "generated_zero_shot_accuracy", "real_zero_shot_accuracy")
    mean = {}
    for k in keys:
        values = [float(v) for row in per_class.values() if (v := row[k]) is not None]
        mean[k] = float(np.mean(values)) if values else None  # macro average over classes
    return {"model": clip.spec.describe(), "templates": list(clip.spec.templates), "per_class": per_class, "mean": mean}


def _as_list(images) -> list:
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(f"expected a batch (N, H, W) or (N, H, W, 3), got shape {images.shape}")
        items = list(images)
    else:
        items = list(images)
    if not items:
        raise ValueError("no images given")
    return items


def _to_pil(image: np.ndarray | Image.Image, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image {index}: expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        return Image.fromarray(image, mode="L").convert("RGB")
    if image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(image, mode="RGB")
    raise ValueError(f"image {index}: expected shape (H, W) or (H, W, 3), got {image.shape}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m model.clip fetch`` (download a tag into a cache dir) or ``tiny`` (write a random smoke model)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m model.clip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download an open_clip model into a cache dir and check that it loads")
    fetch.add_argument("--model", default=DEFAULT_MODEL)
    fetch.add_argument("--pretrained", default=DEFAULT_PRETRAINED)
    fetch.add_argument("--cache-dir", type=Path, required=True)
    tiny = sub.add_parser("tiny", help=f"write a random-weights {TINY_MODEL} checkpoint (offline smoke tests only)")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            clip = load_clip(ClipSpec(model=args.model, pretrained=args.pretrained, cache_dir=args.cache_dir))
        except ClipUnavailable as err:
            raise SystemExit(str(err)) from None
    else:
        clip = load_clip(ClipSpec(model=TINY_MODEL, pretrained=None, random_init=True, seed=args.seed))
        save_checkpoint(clip.model, args.out)
        print(f"wrote {args.out}: use FASHION_CLIP_MODEL={TINY_MODEL} FASHION_CLIP_CHECKPOINT={args.out}")
    print(f"{clip.spec.describe()}: {clip.num_parameters / 1e6:.1f}M parameters, {clip.image_size}px images")


if __name__ == "__main__":
    main()
