"""CLIP with open_clip: ``spec`` (what to load), ``loading`` (tags, checkpoints, the tiny test model) and
``scoring`` (28x28 images against prompts and class prompts); ``python -m model.clip`` fetches or writes
weights.

Weights come from one of:
- an open_clip architecture name plus a pretrained tag, downloaded once into a cache directory;
- a local state-dict file for that architecture, .safetensors or a torch file read with
  ``weights_only=True`` (it wins over the tag);
- random weights, only when asked for explicitly (tests, offline smoke runs).
When none can be had, ``load_clip`` raises ``ClipUnavailable`` saying what was missing.
"""

from model.clip.loading import (
    TINY_MODEL,
    ClipUnavailable,
    import_open_clip,
    load_clip,
    register_model_config,
    save_checkpoint,
    tiny_config,
)
from model.clip.scoring import Clip, ZeroShot, clip_score, evaluate_clip
from model.clip.spec import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_TEMPLATES, ClipSpec

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "DEFAULT_TEMPLATES",
    "TINY_MODEL",
    "Clip",
    "ClipSpec",
    "ClipUnavailable",
    "ZeroShot",
    "clip_score",
    "evaluate_clip",
    "import_open_clip",
    "load_clip",
    "register_model_config",
    "save_checkpoint",
    "tiny_config",
]
