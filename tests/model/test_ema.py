"""model/ema.py: the weights' moving averages, and picking one out of a checkpoint."""

from __future__ import annotations

import pytest
import torch

from model.ema import EMA, ema_weights


def test_a_checkpoints_weights_by_ema_decay_or_the_raw_weights():
    kept, raw = {"0.999": {"w": 1}, "0.9": {"w": 2}}, {"w": 0}
    assert ema_weights(kept, raw, 0.9, "ckpt") == {"w": 2}
    assert ema_weights(kept, raw, 0, "ckpt") is raw
    with pytest.raises(ValueError, match=r"ckpt keeps no EMA with decay 0.5; allowed: 0.999, 0.9, 0 \(the raw"):
        ema_weights(kept, raw, 0.5, "ckpt")


def test_the_ema_warm_up_caps_every_decay_and_a_warm_start_goes_without_it():
    net = torch.nn.Linear(3, 3)
    warm = [EMA(net, decay) for decay in (0.999, 0.9998)]
    cold = [EMA(net, decay, warmup=False) for decay in (0.999, 0.9998)]
    for _ in range(20):
        with torch.no_grad():
            net.weight.add_(1.0)
        for ema in warm + cold:
            ema.update(net)
    # (1 + n) / (10 + n) is below both decays for 20 steps: the two warmed-up EMAs are the same.
    assert torch.equal(warm[0].model.weight, warm[1].model.weight)
    assert not torch.allclose(cold[0].model.weight, cold[1].model.weight)
    start = net.weight - 20
    assert (cold[0].model.weight - start).abs().max() < 0.25  # 0.999 over 20 steps hardly moves
