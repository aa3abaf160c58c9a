"""What CLIP to load (``ClipSpec``) and the defaults: the one type that loading (which builds a
``Clip`` from it) and scoring (a ``Clip`` keeps its spec) both name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.data import CLASS_NAMES

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEFAULT_TEMPLATES = ("a photo of a {}, a type of clothing.",)


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
