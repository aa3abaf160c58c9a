"""A class-conditional U-Net for 28x28 images (Ho et al. 2020; Dhariwal & Nichol 2021).

The architecture is fully described by ``UNetConfig``, which is saved beside the
weights, so a checkpoint is rebuilt with ``UNet(UNetConfig(**card["unet"]))``.

For speed on small machines the first stage can work at half resolution:
``stem_patch=2`` folds each 2x2 pixel block into channels (pixel unshuffle) before
the first convolution and unfolds it after the last, a lossless rearrangement that
makes every convolution four times cheaper. ``full_res_channels`` adds a thin stage at the full
resolution around that fold: a residual block on the way in and one (with a skip) on the way out,
so that edges are drawn where pixels are, not only in 2x2 blocks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 28  # side of the square input, pixels
    in_channels: int = 1  # image channels (1: grayscale)
    stem_patch: int = 2  # pixel-unshuffle factor before the first conv (1: full resolution)
    full_res_channels: int = 0  # with stem_patch > 1: channels of a residual stage at full resolution (0: none)
    base_channels: int = 64  # channels of the first stage
    channel_mults: tuple[int, ...] = (1, 2)  # channels per stage, as multiples of base_channels
    blocks_per_stage: int = 2  # residual blocks per stage on the way down (one more on the way up)
    attention_stages: tuple[int, ...] = (1,)  # stages (0-based) with self-attention after each block
    attention_heads: int = 4  # heads of each self-attention layer
    num_classes: int = 10  # real classes; index num_classes is the "null" class for guidance
    dropout: float = 0.0  # dropout inside residual blocks
    groups: int = 8  # GroupNorm groups
    extra: dict = field(default_factory=dict)  # free-form notes kept with the config (unused by the net)

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_stages", tuple(self.attention_stages))
        for name in (
            "image_size",
            "in_channels",
            "stem_patch",
            "base_channels",
            "blocks_per_stage",
            "attention_heads",
            "num_classes",
            "groups",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be one or more positive integers, got {self.channel_mults}")
        if self.base_channels % 2:
            raise ValueError(
                f"base_channels must be even (it is the width of the sinusoidal time embedding), "
                f"got {self.base_channels}"
            )
        if self.full_res_channels < 0 or (self.full_res_channels and self.stem_patch == 1):
            raise ValueError(
                f"full_res_channels must be 0, or positive with stem_patch > 1, got {self.full_res_channels} "
                f"with stem_patch {self.stem_patch}"
            )
        if self.full_res_channels % self.groups:
            raise ValueError(f"groups {self.groups} must divide full_res_channels {self.full_res_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        side = self.image_size // self.stem_patch
        if self.image_size % self.stem_patch:
            raise ValueError(f"image_size {self.image_size} is not divisible by stem_patch {self.stem_patch}")
        if side % (2 ** (len(self.channel_mults) - 1)):
            raise ValueError(
                f"{len(self.channel_mults)} stages halve the side {len(self.channel_mults) - 1} times, "
                f"but {side} is not divisible by {2 ** (len(self.channel_mults) - 1)}"
            )
        if any(not 0 <= s < len(self.channel_mults) for s in self.attention_stages):
            raise ValueError(f"attention_stages must index 0..{len(self.channel_mults) - 1}")
        chans = [self.base_channels * m for m in self.channel_mults]
        if any(c % self.groups for c in chans):
            raise ValueError(f"groups {self.groups} must divide the channels of every stage {chans}")
        attended = sorted({*self.attention_stages, len(chans) - 1})  # the middle block always has attention
        if any(chans[s] % self.attention_heads for s in attended):
            raise ValueError(
                f"attention_heads {self.attention_heads} must divide the channels "
                f"{[chans[s] for s in attended]} of the stages with attention (the last one included)"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def zero_init(layer: nn.Conv2d) -> None:
    """Zero a layer's weight and bias, so the branch it ends contributes nothing at first."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the embedding applied as a scale and shift (adaptive GroupNorm)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        zero_init(self.conv2)  # each block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        zero_init(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, C/heads) each
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps- or v-prediction network: ``forward(x_t, t, y) -> (B, C, H, W)``.

    ``t`` holds timesteps in [0, T) (floats allowed); ``y`` holds class indices, with
    ``config.num_classes`` meaning "no class" (the unconditional branch of guidance).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        c0 = cfg.base_channels
        emb_dim = 4 * c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)

        stem_in = cfg.in_channels * cfg.stem_patch**2
        f = cfg.full_res_channels
        if f:  # full resolution: conv + block, then the fold; on the way out the unfold, block, conv
            self.full_in = nn.Conv2d(cfg.in_channels, f, 3, padding=1)
            self.full_down = ResBlock(f, f, emb_dim, cfg.groups, cfg.dropout)
            self.stem = nn.Conv2d(f * cfg.stem_patch**2, c0, 1)  # the block mixed space already
        else:
            self.stem = nn.Conv2d(stem_in, c0, 3, padding=1)

        def block(c_in: int, c_out: int, stage: int) -> nn.ModuleList:
            layers: list[nn.Module] = [ResBlock(c_in, c_out, emb_dim, cfg.groups, cfg.dropout)]
            if stage in cfg.attention_stages:
                layers.append(Attention(c_out, cfg.attention_heads, cfg.groups))
            return nn.ModuleList(layers)

        chans = [c0 * m for m in cfg.channel_mults]
        self.down = nn.ModuleList()
        skips = [c0]
        c = c0
        for s, c_out in enumerate(chans):
            for _ in range(cfg.blocks_per_stage):
                self.down.append(block(c, c_out, s))
                c = c_out
                skips.append(c)
            if s < len(chans) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)

        last = len(chans) - 1
        self.mid = nn.ModuleList(
            [
                ResBlock(c, c, emb_dim, cfg.groups, cfg.dropout),
                Attention(c, cfg.attention_heads, cfg.groups),
                ResBlock(c, c, emb_dim, cfg.groups, cfg.dropout),
            ]
        )

        self.up = nn.ModuleList()
        for s in reversed(range(len(chans))):
            for _ in range(cfg.blocks_per_stage + 1):
                self.up.append(block(c + skips.pop(), chans[s], s))
                c = chans[s]
            if s > 0:
                self.up.append(
                    nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)])
                )
        assert not skips and last >= 0

        self.out_norm = nn.GroupNorm(cfg.groups, c)
        if f:
            self.unstem = nn.Conv2d(c, f * cfg.stem_patch**2, 1)
            self.full_up = ResBlock(2 * f, f, emb_dim, cfg.groups, cfg.dropout)
            self.full_norm = nn.GroupNorm(cfg.groups, f)
            self.out_conv = nn.Conv2d(f, cfg.in_channels, 3, padding=1)
        else:
            self.out_conv = nn.Conv2d(c, stem_in, 3, padding=1)
        zero_init(self.out_conv)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels)) + self.class_emb(y)  # (B, 4C)
        if cfg.full_res_channels:
            full = self.full_down(self.full_in(x), emb)  # (B, F, H, W)
            x = F.pixel_unshuffle(full, cfg.stem_patch)  # (B, F*p*p, H/p, W/p)
        elif cfg.stem_patch > 1:
            x = F.pixel_unshuffle(x, cfg.stem_patch)  # (B, p*p, H/p, W/p)
        h = self.stem(x)  # (B, C, H/p, W/p)
        skips = [h]
        for layers in self.down.children():
            h = _apply(layers, h, emb)
            skips.append(h)
        h = _apply(self.mid, h, emb)
        for layers in self.up.children():
            if isinstance(next(layers.children()), ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            h = _apply(layers, h, emb)
        if cfg.full_res_channels:
            h = F.pixel_shuffle(self.unstem(F.silu(self.out_norm(h))), cfg.stem_patch)  # (B, F, H, W)
            h = self.full_up(torch.cat([h, full], dim=1), emb)  # (B, F, H, W)
            return self.out_conv(F.silu(self.full_norm(h)))  # (B, 1, H, W)
        h = self.out_conv(F.silu(self.out_norm(h)))  # (B, p*p, H/p, W/p)
        if cfg.stem_patch > 1:
            h = F.pixel_shuffle(h, cfg.stem_patch)  # (B, 1, H, W)
        return h


def _apply(layers: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Run a ModuleList in order; residual blocks also take the embedding."""
    for layer in layers.children():
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h


def tiny_config() -> UNetConfig:
    """The smallest config that still has two stages, for tests and smoke runs (a few thousand parameters)."""
    return UNetConfig(base_channels=8, channel_mults=(1, 2), attention_stages=(), groups=4)


def perturbed_unet(config: UNetConfig, seed: int = 0, scale: float = 0.05) -> UNet:
    """A UNet in eval mode whose parameters all carry seeded noise, for tests and smoke runs.

    A fresh UNet outputs exactly zero (its output layer and every residual branch start at zero),
    so every image would be the same; the noise makes its output depend on x_t, t and the class,
    as a trained network's does. Its images mean nothing.
    """
    with torch.random.fork_rng():  # seeded init and noise, without touching the caller's RNG
        torch.manual_seed(seed)
        model = UNet(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
