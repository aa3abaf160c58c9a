"""Scoring with a loaded CLIP: preprocessing of 28x28 grayscale images, prompts, embeddings and cosines.

CLIP (Radford et al. 2021) embeds images and texts in one space; the cosine between the two
embeddings says how well a text describes an image. CLIPScore (Hessel et al. 2021) reports
``100 * max(cos, 0)``. Zero-shot classification compares an image with one prompt per class
and takes a softmax over ``logit_scale * cos``; several prompt templates per class are averaged
in embedding space, as in CLIP's zero-shot recipe (paper section 3.1.4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.clip.spec import ClipSpec
from model.data import parse_class


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
        name = self.spec.class_names[parse_class(class_, self.spec.class_names)]
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

    def class_cosine(self, emb: torch.Tensor, classes: int | Sequence[int] | np.ndarray) -> torch.Tensor:
        """Cosine of each image embedding (N, D) with its class prompt (templates averaged): (N,).
        ``classes`` is one class for every image, or one per image."""
        target = self.class_embeddings[torch.as_tensor(classes, dtype=torch.long)]  # (D,) or (N, D)
        return emb @ target if target.ndim == 1 else (emb * target).sum(dim=1)

    def score_class(self, images, class_: int | str) -> np.ndarray:
        """Cosine of each image with the class prompt (templates averaged): (N,) float32."""
        return self.class_cosine(self.encode_images(images), parse_class(class_, self.spec.class_names)).numpy()

    @torch.inference_mode()
    def zero_shot(self, images, batch_size: int = 256) -> ZeroShot:
        """Zero-shot classification over the class prompts."""
        return self.zero_shot_embedded(self.encode_images(images, batch_size))

    def zero_shot_embedded(self, emb: torch.Tensor) -> ZeroShot:
        """Zero-shot classification of image embeddings (N, D) already computed."""
        logit_scale = self.model.logit_scale.detach().float().cpu().exp()
        logits = logit_scale * emb @ self.class_embeddings.T  # (N, C)
        probs = logits.softmax(dim=-1)
        return ZeroShot(labels=probs.argmax(-1).numpy().astype(np.int64), probs=probs.numpy())


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
            row[f"{source}_similarity"] = float(clip.class_cosine(emb, c).mean())
            row[f"{source}_zero_shot_accuracy"] = float((clip.zero_shot_embedded(emb).labels == c).mean())
            row[f"n_{source}"] = len(images)
        if row["n_generated"] or row["n_real"]:
            per_class[name] = row
    keys = ("generated_similarity", "real_similarity", "generated_zero_shot_accuracy", "real_zero_shot_accuracy")
    mean = {}
    for k in keys:
        values = [float(v) for row in per_class.values() if (v := row[k]) is not None]
        mean[k] = float(np.mean(values)) if values else None  # macro average over classes
    return {"model": clip.spec.describe(), "templates": list(clip.spec.templates), "per_class": per_class, "mean": mean}
