"""A small Fashion-MNIST classifier, trained here and used only to judge generated samples.

    python -m model.classifier train --data-dir ../shared/data/fashion-mnist --out weights/classifier.safetensors

Its penultimate layer (global-average-pooled, ``feature_dim`` wide) is the feature space of the
Frechet distance in ``model.evaluate``; its softmax gives the class accuracy of samples and
the "classifier" reranking of the service.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from model.data import NUM_CLASSES, FashionMNIST, to_model_range
from model.io import WeightsError, atomic_write_bytes, save_weights_file
from model.machine import describe


@dataclass(frozen=True)
class ClassifierConfig:
    widths: tuple[int, ...] = (32, 64, 128)  # channels at 28x28, 14x14 and 7x7
    dropout: float = 0.3  # before the final linear layer
    num_classes: int = NUM_CLASSES

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """Conv-BN-ReLU stages separated by 2x2 max-pooling, global average pooling, one linear layer.
    Inputs are (B, 1, 28, 28) in [-1, 1], the diffusion model's range."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.widths
        layers: list[nn.Module] = [_conv_bn(1, w[0])]
        for c_in, c_out in zip(w[:-1], w[1:], strict=True):
            layers += [nn.MaxPool2d(2), _conv_bn(c_in, c_out), _conv_bn(c_out, c_out)]
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, num_classes)


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate every image by its own random offset of up to ``max_shift`` pixels each way,
    filling the uncovered border with background (-1): cheap augmentation that helps a small net
    generalise."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1, 1))
    rows = torch.arange(h).view(1, h, 1) + dy  # (B, H, 1)
    cols = torch.arange(w).view(1, 1, w) + dx  # (B, 1, W)
    return padded[torch.arange(b).view(b, 1, 1), 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def predict(model: Classifier, x: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities (N, 10), features (N, D)) for images in [-1, 1]."""
    model.eval()
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i : i + batch_size])
        probs.append(F.softmax(model.head(f), dim=1).cpu().numpy())
        feats.append(f.cpu().numpy())
    return np.concatenate(probs), np.concatenate(feats).astype(np.float64)


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 8  # passes over the training images
    batch_size: int = 128  # images per step
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule (AdamW, weight decay 5e-4)
    max_shift: int = 2  # random translation of training images, in pixels


def fit_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    config: ClassifierConfig = ClassifierConfig(),
    fit: FitConfig = FitConfig(),
    seed: int = 0,
    progress: bool = True,
) -> Classifier:
    """A classifier trained on ``images`` (uint8 (N, 28, 28)) with ``labels`` (ints in 0..num_classes-1).

    ``seed`` fixes the initial weights, the data order, the shifts and the dropout: on the CPU, the
    same arrays, settings, seed and thread count give the same weights."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ints of shape ({len(images)},), got {labels.dtype} {labels.shape}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < config.num_classes:
        raise ValueError(f"labels must lie in 0..{config.num_classes - 1}, got {labels.min()}..{labels.max()}")
    if len(images) < fit.batch_size:
        raise ValueError(f"need at least one batch ({fit.batch_size} images) to train on, got {len(images)}")
    torch.manual_seed(seed)
    x, y = to_model_range(images), torch.from_numpy(labels.astype(np.int64))
    model = Classifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=fit.lr, weight_decay=5e-4)
    batches = len(x) // fit.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=fit.lr, total_steps=fit.epochs * batches)
    for epoch in range(fit.epochs):
        model.train()
        order = torch.randperm(len(x))
        bar = tqdm(range(batches), desc=f"classifier epoch {epoch + 1}/{fit.epochs}", disable=not progress)
        for i in bar:
            idx = order[i * fit.batch_size : (i + 1) * fit.batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], fit.max_shift)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def train_classifier(
    data_dir: str | None,
    out: Path,
    config: ClassifierConfig = ClassifierConfig(),
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 3e-3,
    max_shift: int = 2,
    seed: int = 0,
    progress: bool = True,
    train_limit: int | None = None,
) -> dict:
    """Train on the 55,000-image split, report validation and test accuracy, save weights + card."""
    data = FashionMNIST.load(data_dir)
    (tr_x, tr_y), (va_x, va_y) = data.split(seed=seed)
    if train_limit:
        tr_x, tr_y = tr_x[:train_limit], tr_y[:train_limit]
    start = time.perf_counter()
    fit = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, max_shift=max_shift)
    model = fit_classifier(tr_x, tr_y, config, fit, seed=seed, progress=progress)
    minutes = (time.perf_counter() - start) / 60
    val_acc = float((predict(model, to_model_range(va_x))[0].argmax(1) == va_y).mean())
    test_acc = float((predict(model, to_model_range(data.test_images))[0].argmax(1) == data.test_labels).mean())
    card = {
        "kind": "classifier",
        "config": asdict(config),
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "max_shift": max_shift,
            "seed": seed,
            "wall_minutes": round(minutes, 2),
            "hardware": describe(),
        },
        "accuracy": {"validation": round(val_acc, 4), "test": round(test_acc, 4)},
    }
    save_weights_file(model.state_dict(), out)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(card, indent=2) + "\n").encode())
    return card


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Rebuild the classifier from its card and safetensors weights (no pickle)."""
    path = Path(path)
    card_path = path.with_suffix(".json")
    if not path.exists():
        raise WeightsError(f"{path}: classifier weights not found (train them with `python -m model.classifier train`)")
    try:
        config = ClassifierConfig(**json.loads(card_path.read_text())["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightsError(f"{card_path}: unusable classifier card ({err})") from err
    model = Classifier(config)
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as err:  # safetensors raises its own error types
        raise WeightsError(f"{path}: cannot load classifier weights ({str(err).splitlines()[0]})") from err
    return model.to(device).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.classifier", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data-dir", default=None)
    t.add_argument("--out", default="weights/classifier.safetensors")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--widths", type=int, nargs="+", default=list(ClassifierConfig.widths), help="channels per stage")
    t.add_argument("--max-shift", type=int, default=2, help="random translation of training images, in pixels")
    t.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = ClassifierConfig(widths=tuple(a.widths))
    card = train_classifier(a.data_dir, Path(a.out), config, epochs=a.epochs, max_shift=a.max_shift)
    print(json.dumps(card["accuracy"]), f"{card['training']['wall_minutes']} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
