"""model/distill.py and model/trajectories.py with a tiny teacher: trajectories, the student's
training, its card and the command line."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from model import distill, trajectories
from model.cli import config_from_args
from model.io import load_weights, read_card, save_weights
from model.samplers import generators_from_seeds, initial_noise, sample
from model.unet import UNet
from testkit.weights import TINY_UNET, tiny_card


@pytest.fixture
def teacher(tmp_path, tiny_unet, tiny_card):
    """A tiny teacher whose card samples like the shipped one: DPM-Solver++ 20 steps, guided."""
    card = {**tiny_card, "name": "tiny-teacher", "sampling": {"sampler": "dpm++", "steps": 20, "guidance": 1.5}}
    path = tmp_path / "teacher" / "tiny-teacher.safetensors"
    save_weights(tiny_unet, card, path)
    return path


def make(teacher, run_dir, count=8, shard=4):
    cfg = trajectories.TrajectoryConfig(str(teacher), str(run_dir), count, shard, precision="float32", threads=1)
    trajectories.make_trajectories(cfg, progress=False)


def test_a_shard_holds_the_teachers_own_trajectories(teacher, tmp_path):
    make(teacher, tmp_path / "run")
    shard = load_file(str(trajectories.shard_path(tmp_path / "run", 1)))
    assert shard["x_t"].shape == (20, 4, 1, 28, 28) and shard["x_t"].dtype == torch.float16
    assert shard["timesteps"].tolist() == [999 - 50 * i for i in range(20)]
    # Shard 1 holds images 4..7: their seeds and classes, and they end where the teacher's sampler ends.
    assert shard["labels"].tolist() == [4, 5, 6, 7]
    seeds = range(trajectories.SEED_BASE + 4, trajectories.SEED_BASE + 8)
    torch.testing.assert_close(
        shard["x_t"][0].float(), initial_noise(generators_from_seeds(seeds), (1, 28, 28), "cpu"), atol=2e-3, rtol=1e-3
    )
    den = load_weights(teacher).denoiser
    end = sample(den, torch.tensor([4, 5, 6, 7]), generators_from_seeds(seeds), "dpm++", 20, 1.5)
    torch.testing.assert_close(shard["x0"], end)


def test_trajectories_resume_and_refuse_another_teacher(teacher, tmp_path, tiny_unet, tiny_card):
    run = tmp_path / "run"
    make(teacher, run, count=4)
    first = trajectories.shard_path(run, 0)
    stamp = first.stat().st_mtime_ns
    make(teacher, run, count=8)
    assert first.stat().st_mtime_ns == stamp  # kept, not sampled again
    assert trajectories.shard_path(run, 1).exists()
    assert not list((run / "trajectories").glob("*.part"))
    other = tmp_path / "other" / "tiny-teacher.safetensors"
    save_weights(tiny_unet, tiny_card, other)
    with pytest.raises(ValueError, match="another teacher"):
        make(other, run)
    with pytest.raises(ValueError, match="multiple of shard_size"):
        make(teacher, run, count=6)


def test_pairs_take_the_students_timesteps_and_refuse_ones_the_teacher_never_passed(teacher, tmp_path):
    make(teacher, tmp_path / "run")
    paths = [trajectories.shard_path(tmp_path / "run", k) for k in (0, 1)]
    pairs = trajectories.Pairs.load(paths, [999, 499])
    assert len(pairs.t) == 16 and sorted(set(pairs.t.tolist())) == [499, 999]
    shard = load_file(str(paths[0]))
    at_499 = (pairs.t == 499).nonzero().flatten()[:4]
    torch.testing.assert_close(pairs.x_t[at_499], shard["x_t"][10])  # step 10 of 20 is at t = 499
    torch.testing.assert_close(pairs.x0[at_499], shard["x0"])
    assert pairs.cpu_seconds > 0
    with pytest.raises(ValueError, match=r"never pass timesteps \[500\]"):
        trajectories.Pairs.load(paths, [999, 500])


def test_the_loss_is_the_pseudo_huber_distance_of_the_x0_prediction(teacher):
    t_weights = load_weights(teacher)
    den = t_weights.denoiser
    x_t, t, y = torch.randn(2, 1, 28, 28), torch.tensor([999, 249]), torch.tensor([1, 2])
    out = den.model(x_t, t.float(), y)
    ab = torch.from_numpy(den.schedule.alpha_bar[[999, 249]]).float().reshape(-1, 1, 1, 1)
    x0_pred = ab.sqrt() * x_t - (1 - ab).sqrt() * out  # from v (Salimans & Ho 2022)
    assert distill.consistency_loss(den.model, t_weights, x_t, t, y, x0_pred, 0.1).item() == pytest.approx(0, abs=1e-5)
    shifted = x0_pred + 0.5  # every pixel off by 0.5: |d|^2 = 784 / 4
    expected = math.sqrt(196 + 0.01) - 0.1
    got = distill.consistency_loss(den.model, t_weights, x_t, t, y, shifted, 0.1).item()
    assert got == pytest.approx(expected, rel=1e-4)


def config(teacher, run, **kw):
    base = dict(
        teacher=str(teacher),
        run_dir=str(run),
        steps=6,
        batch_size=8,
        lr=1e-3,
        warmup_steps=1,
        cooldown_steps=0,
        ema_decays=(0.9,),
        val_trajectories=4,
        checkpoint_every=3,
        threads=1,
        precision="float32",
        student_steps=2,
    )
    return distill.DistillConfig(**{**base, **kw})


def test_the_student_learns_the_trajectories_and_a_resumed_run_is_the_same_run(teacher, tmp_path):
    run = tmp_path / "run"
    make(teacher, run, count=12)
    whole = torch.load(distill.distill(config(teacher, run, steps=30)), weights_only=True)
    t_weights = load_weights(teacher)
    val = trajectories.Pairs.load([trajectories.shard_path(run, 2)], [999, 499])
    before = distill.validation_loss(t_weights.model, t_weights, val, config(teacher, run))
    assert whole["step"] == 30 and whole["val_loss"] < 0.9 * before  # held-out trajectories: closer than the teacher

    (run / "student.pt").unlink()
    distill.distill(config(teacher, run, steps=3))
    resumed = torch.load(distill.distill(config(teacher, run, steps=30), resume=True), weights_only=True)
    assert resumed["step"] == 30
    for key, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, msg=key)
    rows = [json.loads(line) for line in (run / "distill_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-3:] == [24, 27, 30]


def test_the_exported_student_names_its_teacher_and_samples_in_its_steps(teacher, tmp_path):
    run = tmp_path / "run"
    make(teacher, run, count=12)
    distill.distill(config(teacher, run))
    out = tmp_path / "weights" / "tiny-student.safetensors"
    distill.export(run, out, ema_decay=0, name="tiny-student")
    student = load_weights(out)
    card = student.card
    assert card["name"] == "tiny-student"
    assert card["sampling"] == {"sampler": "consistency", "steps": 2, "guidance": 1.0, "guidance_interval": None}
    assert card["distillation"]["teacher"] == "tiny-teacher" and card["distillation"]["guidance"] == 1.5
    assert card["distillation"]["trajectories"] == 12 and card["distillation"]["timesteps"] == [999, 499]
    assert card["training"]["steps"] == 6 and card["training"]["total_cpu_minutes"] >= 0
    saved = torch.load(run / "student.pt", weights_only=True)
    for key, value in saved["model"].items():  # --ema 0: the raw weights
        torch.testing.assert_close(student.model.state_dict()[key], value)
    calls = []
    student.model.register_forward_hook(lambda *_: calls.append(1))
    x = sample(student.denoiser, torch.tensor([3, 4]), generators_from_seeds([0, 1]), "consistency", 2, 1.0)
    assert x.shape == (2, 1, 28, 28) and len(calls) == 2  # one evaluation per step: no unconditional pass
    with pytest.raises(ValueError, match=r"keeps no EMA with decay 0.5; allowed: 0.9, 0 \(the raw weights\)"):
        distill.export(run, out, ema_decay=0.5)


def test_a_warm_started_student_starts_from_the_earlier_one_and_its_card_counts_both(teacher, tmp_path):
    """--init-from: the student starts from an earlier student (not the teacher); the card names it and
    adds its CPU minutes to this distillation's. A student of another network is refused."""
    run = tmp_path / "run"
    make(teacher, run, count=12)
    distill.distill(config(teacher, run))
    earlier = tmp_path / "weights" / "earlier.safetensors"
    distill.export(run, earlier, ema_decay=0, name="earlier")
    again = tmp_path / "again"
    make(teacher, again, count=12)
    start = distill.Student.new(config(teacher, again, init_from=str(earlier)), load_weights(teacher))
    for key, value in load_weights(earlier).model.state_dict().items():
        assert torch.equal(start.model.state_dict()[key], value), key
    distill.distill(config(teacher, again, init_from=str(earlier)))
    out = tmp_path / "weights" / "warm.safetensors"
    card = read_card(distill.export(again, out, ema_decay=0, name="warm"))["training"]
    first = read_card(earlier)["training"]
    assert card["initialised_from"] == {"weights": "earlier.safetensors", "training": first}
    both = card["total_cpu_minutes"] + first["total_cpu_minutes"]
    assert card["cumulative_cpu_minutes"] == pytest.approx(both, abs=0.1)

    other, wider = tmp_path / "other.safetensors", replace(TINY_UNET, base_channels=16)
    save_weights(UNet(wider), tiny_card(wider), other)
    with pytest.raises(ValueError, match="UNetConfig .* differs"):
        distill.Student.new(config(teacher, again, init_from=str(other)), load_weights(teacher))


def test_each_stage_takes_one_option_per_field_of_its_config(teacher, tmp_path):
    args = distill.parse_args(["train", "--teacher", "t.safetensors", "--run-dir", "r", "--ema-decays", "0.9", "0.99"])
    cfg = config_from_args(distill.DistillConfig, args)
    assert cfg == distill.DistillConfig(teacher="t.safetensors", run_dir="r", ema_decays=(0.9, 0.99))
    assert not args.resume
    # Every field has its option, those that had none before too.
    args = distill.parse_args(["train", "--teacher", "t", "--run-dir", "r", "--huber-c", "0.5", "--timesteps", "999"])
    assert config_from_args(distill.DistillConfig, args).huber_c == 0.5
    assert config_from_args(distill.DistillConfig, args).timesteps == (999,)
    with pytest.raises(SystemExit):  # --teacher has no default: it is required
        distill.parse_args(["train", "--run-dir", "r"])
    with pytest.raises(ValueError, match="at least one decay"):
        config_from_args(
            distill.DistillConfig, distill.parse_args(["train", "--teacher", "t", "--run-dir", "r", "--ema-decays"])
        )

    run = tmp_path / "run"
    argv = ["trajectories", "--teacher", str(teacher), "--run-dir", str(run), "--count", "4", "--shard-size", "2"]
    distill.main([*argv, "--threads", "1", "--no-progress"])
    assert [trajectories.shard_path(run, k).exists() for k in (0, 1, 2)] == [True, True, False]
    assert load_file(str(trajectories.shard_path(run, 0)))["x_t"].shape == (20, 2, 1, 28, 28)
