"""model/machine.py: the device to run on, as training and the service both resolve it."""

from __future__ import annotations

import pytest
import torch

from model.machine import compile_pays, faster_layout, native_bfloat16, resolve_device


def test_auto_is_cuda_when_present_else_the_cpu(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_an_absent_device_is_an_error_that_names_where_it_was_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"device 'cuda:1' requested but CUDA is not available \(set --device=auto"):
        resolve_device("cuda:1")
    with pytest.raises(RuntimeError, match=r"\(set FASHION_DEVICE=auto or cpu\)"):
        resolve_device("cuda", setting="FASHION_DEVICE")
    with pytest.raises(RuntimeError, match="device 'mps' requested but MPS is not available"):
        resolve_device("mps")
    with pytest.raises(RuntimeError, match="Expected one of"):  # torch's own message for a name it does not know
        resolve_device("gpu")


def test_native_bfloat16_means_avx512_bf16_or_amx():
    assert native_bfloat16(frozenset({"sse2", "avx512f", "avx512_bf16"}))
    assert native_bfloat16(frozenset({"amx_tile", "amx_bf16"}))
    assert not native_bfloat16(frozenset({"avx2", "avx512f", "avx512_vnni"}))  # AVX-512 alone emulates bf16
    assert not native_bfloat16(frozenset())  # no /proc/cpuinfo: float32


def test_the_layout_is_measured_and_channels_last_keeps_a_near_tie(tiny_unet):
    shape = (tiny_unet.config.in_channels, tiny_unet.config.image_size, tiny_unet.config.image_size)
    channels_last, seconds = faster_layout(tiny_unet, torch.float32, shape, rows=4, repeats=2)
    assert set(seconds) == {"channels_last", "nchw"} and all(s > 0 for s in seconds.values())
    assert channels_last == (seconds["nchw"] >= 0.95 * seconds["channels_last"])
    # NCHW would have to take no time at all to win with a margin of 100%, and wins at once with -1000%.
    assert faster_layout(tiny_unet, torch.float32, shape, rows=4, repeats=1, margin=1.0)[0]
    assert not faster_layout(tiny_unet, torch.float32, shape, rows=4, repeats=1, margin=-10.0)[0]


def test_compile_auto_compiles_on_cuda_only():
    assert compile_pays(torch.device("cuda"))
    assert not compile_pays(torch.device("cpu"))
