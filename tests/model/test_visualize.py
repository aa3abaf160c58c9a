"""model/visualize.py: the forward-process and reverse-trajectory pictures, library and CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import to_model_range
from model.diffusion import Schedule
from model.io import load_weights
from model.samplers import generators_from_seeds, sample, spaced_timesteps, to_uint8
from model.visualize import (
    example_images,
    forward_grid,
    forward_process,
    main,
    reverse_grid,
    reverse_trajectory,
)


def tile(picture: Image.Image, row: int, col: int, scale: int) -> np.ndarray:
    """The 28x28 tile at (row, col) of a grid with 2-pixel padding, scaled back down."""
    a = np.asarray(picture)[::scale, ::scale]
    return a[2 + row * 30 : 2 + row * 30 + 28, 2 + col * 30 : 2 + col * 30 + 28]


def test_example_images_are_the_first_test_image_of_each_class(small_fashion_dir, idx_tools):
    arrays = idx_tools.small_dataset()
    images, labels = example_images(small_fashion_dir, per_class=2)
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    first = [int(np.flatnonzero(arrays["test_labels"] == c)[k]) for c in range(10) for k in range(2)]
    assert np.array_equal(images, arrays["test_images"][first])
    with pytest.raises(ValueError, match=r"2 images of class 0 \(t-shirt/top\), need 3"):
        example_images(small_fashion_dir, per_class=3)


def test_forward_process_goes_from_the_image_to_noise_with_one_noise_draw_per_row():
    sch = Schedule.named("cosine")
    x0 = torch.rand(3, 1, 28, 28) * 2 - 1
    frames, ts = forward_process(sch, x0, columns=10, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (3, 11, 1, 28, 28) and ts == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert torch.equal(frames[:, 0], x0)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(ts[1:], start=1):  # x_t with alpha_bar after t noising steps, the same eps along the row
        ab = sch.alpha_bar[t - 1]
        torch.testing.assert_close(frames[:, k], math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps, atol=1e-5, rtol=0)
    assert frames[:, 1].sub(x0).abs().mean() < frames[:, 5].sub(x0).abs().mean()  # noisier left to right
    torch.testing.assert_close(frames[:, -1], eps, atol=1e-3, rtol=0)  # t = T: nothing of the image is left


def test_forward_grid_lays_out_rows_of_images_and_columns_of_timesteps():
    sch = Schedule.named("linear")
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    frames, _ = forward_process(sch, x0, columns=4)
    picture = forward_grid(frames, scale=3)
    assert picture.size == ((5 * 30 + 2) * 3, (2 * 30 + 2) * 3)
    assert np.array_equal(tile(picture, 1, 0, 3), to_uint8(x0[1:2])[0])
    assert np.array_equal(tile(picture, 1, 3, 3), to_uint8(frames[1, 3:4])[0])


def test_reverse_trajectory_records_every_k_steps_without_changing_the_result(tiny_weights):
    den = load_weights(tiny_weights).denoiser
    labels = torch.tensor([0, 7])
    traj = reverse_trajectory(den, labels, [3, 4], "dpm++", steps=10, every=4, guidance=2.0)
    assert traj.steps == [0, 4, 8, 9]  # every 4th step and the last one
    assert traj.t == [spaced_timesteps(1000, 10)[i] for i in traj.steps]
    assert traj.x_t.shape == traj.x0_pred.shape == (2, 4, 1, 28, 28)
    plain = sample(den, labels, generators_from_seeds([3, 4]), "dpm++", 10, 2.0)
    assert torch.equal(traj.final, plain)
    x_T = torch.stack([torch.randn((1, 28, 28), generator=g) for g in generators_from_seeds([3, 4])])
    assert torch.equal(traj.x_t[:, 0], x_T)
    with pytest.raises(ValueError, match="every must be a positive number of steps"):
        reverse_trajectory(den, labels, [3, 4], "dpm++", steps=10, every=0)


def test_reverse_grid_puts_x_t_above_the_x0_prediction(tiny_weights):
    den = load_weights(tiny_weights).denoiser
    traj = reverse_trajectory(den, torch.tensor([1, 2, 3]), [0, 1, 2], "ddim", steps=6, every=2)
    picture = reverse_grid(traj, scale=1)
    assert traj.steps == [0, 2, 4, 5]
    assert picture.size == (5 * 30 + 2, 6 * 30 + 2)  # 4 recorded steps + the sample; 2 rows per class
    assert np.array_equal(tile(picture, 2, 1, 1), to_uint8(traj.x_t[1, 1:2])[0])  # class 2: x_t at step 2
    assert np.array_equal(tile(picture, 3, 2, 1), to_uint8(traj.x0_pred[1, 2:3])[0])  # ... its x0 at step 4
    assert np.array_equal(tile(picture, 5, 4, 1), to_uint8(traj.final[2:3])[0])  # class 3: the sample


def test_cli_forward_writes_the_png(tiny_weights, small_fashion_dir, tmp_path, capsys):
    out = tmp_path / "pics" / "forward.png"
    assert (
        main(
            [
                "forward",
                "--weights",
                str(tiny_weights),
                "--data-dir",
                str(small_fashion_dir),
                "-o",
                str(out),
                "--scale",
                "1",
            ]
        )
        == 0
    )
    with Image.open(out) as picture:
        assert picture.size == (11 * 30 + 2, 10 * 30 + 2) and picture.mode == "L"
        images, _ = example_images(small_fashion_dir)
        assert np.array_equal(tile(picture, 4, 0, 1), to_uint8(to_model_range(images[4:5]))[0])
    assert "t = 0, 100, 200" in capsys.readouterr().out
    # Without weights, a named schedule is enough.
    assert (
        main(
            [
                "forward",
                "--schedule",
                "linear",
                "--weights",
                str(tmp_path / "none.safetensors"),
                "--data-dir",
                str(small_fashion_dir),
                "-o",
                str(tmp_path / "f2.png"),
            ]
        )
        == 0
    )


def test_cli_reverse_writes_the_png(tiny_weights, tmp_path, capsys):
    out = tmp_path / "reverse.png"
    assert (
        main(
            [
                "reverse",
                "--weights",
                str(tiny_weights),
                "--sampler",
                "dpm++",
                "--steps",
                "4",
                "--every",
                "2",
                "--classes",
                "0",
                "9",
                "--scale",
                "2",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    with Image.open(out) as picture:
        assert picture.size == ((4 * 30 + 2) * 2, (4 * 30 + 2) * 2)  # steps 0, 2, 3 and the sample
    printed = capsys.readouterr().out
    assert "t-shirt/top, ankle boot" in printed and "steps 0, 2, 3" in printed


def test_cli_names_missing_weights(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reverse", "--weights", str(tmp_path / "gone.safetensors"), "-o", str(tmp_path / "r.png")])
    assert exit_info.value.code == 2
    assert "gone.safetensors: weights file not found" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()
