"""Loading CLIP with open_clip: a pretrained tag found in a cache directory, a local checkpoint, or
random weights for tests; the tiny test architecture; and a fix for mismatched torchvision builds.

open_clip is imported lazily, so the rest of ``model`` works without the ``clip`` extra.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.clip.scoring import Clip
from model.clip.spec import ClipSpec

log = logging.getLogger(__name__)

TINY_MODEL = "fashion-clip-tiny"  # registered with open_clip on first use; random weights unless a checkpoint


class ClipUnavailable(RuntimeError):
    """No usable CLIP model: open_clip missing, weights not found or not downloadable, unknown name."""

    def __init__(self, problem: str):
        super().__init__(f"CLIP is unavailable: {problem.rstrip('. ')}.")
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


def load_clip(spec: ClipSpec) -> Clip:
    """Build the model, its tokenizer and preprocessing from ``spec``; ClipUnavailable when it cannot."""
    open_clip = import_open_clip()
    if spec.model == TINY_MODEL:
        register_model_config(TINY_MODEL, tiny_config())
    if not spec.model.startswith(("local-dir:", "hf-hub:")) and spec.model not in open_clip.list_models():
        raise ClipUnavailable(
            f"open_clip knows no architecture {spec.model!r} (ClipSpec.model); "
            f"known ones include {', '.join(open_clip.list_models()[:8])}, ..."
        )
    kwargs: dict[str, Any] = {"device": spec.device, "weights_only": True}
    if spec.cache_dir is not None:
        kwargs["cache_dir"] = str(spec.cache_dir)
    if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
        raise ClipUnavailable(f"checkpoint {spec.checkpoint} not found (ClipSpec.checkpoint)")
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
            f"{spec.pretrained!r} is not a pretrained tag of {spec.model} (ClipSpec.pretrained); "
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
        raise ClipUnavailable(f"{spec.describe()} is not in {where} and downloads are off (ClipSpec.download)")
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
