"""model/train.py and model/teacher.py: short real training runs of a tiny U-Net on a subset of the real data.

One run of two epochs is shared by several tests (module fixture); the resume and time-budget
tests start from copies of it or run on their own. About 10 s on two busy CPU cores.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.data import FashionMNIST, to_model_range
from model.diffusion import Schedule
from model.io import load_weights, read_card
from model.teacher import TrainConfig, lr_factor, validation_loss
from model.train import export, parse_args, train
from model.unet import UNet, UNetConfig, tiny_config

TINY = tiny_config()
STEPS_PER_EPOCH = 8  # 512 images / batch 64


def epoch_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".part")]


@pytest.fixture(scope="module")
def trained(tiny_train_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = tiny_train_config(root)
    card_path = train(cfg, progress=False)
    return cfg, root, card_path


def test_a_run_writes_metrics_samples_checkpoint_and_weights(trained):
    cfg, root, card_path = trained
    run = Path(cfg.run_dir)
    rows = epoch_rows(run)
    assert [(r["epoch"], r["step"], r["images"]) for r in rows] == [(1, 8, 512), (2, 16, 1024)]
    for epoch in (1, 2):
        with Image.open(run / f"samples_epoch{epoch:03d}.png") as im:
            assert im.size == ((8 * 30 + 2) * 2, (10 * 30 + 2) * 2)  # 8 per class x 10 classes, 28 px + 2 pad, x2
    assert (run / "loss_curve.png").stat().st_size > 1000
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"], state["images_seen"]) == (2, 16, 1024)
    assert not leftovers(root)

    assert card_path == Path(cfg.weights_dir) / "tiny.json"
    loaded = load_weights(Path(cfg.weights_dir) / "tiny.safetensors")
    assert loaded.model.config == TINY
    assert loaded.card["diffusion"] == {"schedule": "cosine", "T": 1000, "prediction": "v"}
    record = loaded.card["training"]
    assert (record["epochs"], record["steps"], record["images_seen"]) == (2, 16, 1024)
    assert record["final_val_loss"] == pytest.approx(rows[-1]["val_loss"])
    assert record["wall_minutes"] >= 0 and record["hardware"] and record["parameters"] > 0
    # The exported tensors are the EMA weights of the checkpoint.
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state["ema"][key]), key


def val_loss_before_and_after(cfg: TrainConfig, fashion_mnist_dir: Path) -> tuple[float, float]:
    """The validation loss of an untrained tiny network and of the one ``cfg``'s run exported."""
    (_, _), (va_x, va_y) = FashionMNIST.load(fashion_mnist_dir).split(cfg.val_size, cfg.seed)
    x, y = to_model_range(va_x), torch.from_numpy(va_y)
    schedule = Schedule.named(cfg.schedule, cfg.T)
    untrained = validation_loss(UNet(TINY).eval(), schedule, cfg, x, y)
    trained_model = load_weights(Path(cfg.weights_dir) / "tiny.safetensors").model
    return untrained, validation_loss(trained_model, schedule, cfg, x, y)


def test_training_lowers_the_loss(trained, fashion_mnist_dir):
    cfg, _, _ = trained
    untrained, after = val_loss_before_and_after(cfg, fashion_mnist_dir)
    assert after < 0.9 * untrained, (untrained, after)  # 0.27 -> 0.22 here
    rows = epoch_rows(Path(cfg.run_dir))
    assert rows[1]["val_loss"] < rows[0]["val_loss"]


def test_edm_noise_levels_train_and_are_recorded(tiny_train_config, tmp_path, fashion_mnist_dir):
    cfg = tiny_train_config(tmp_path, noise_levels="lognormal", min_snr_gamma=None)
    card = read_card(train(cfg, progress=False))
    assert card["training"]["config"]["noise_levels"] == "lognormal"
    untrained, after = val_loss_before_and_after(cfg, fashion_mnist_dir)
    assert after < 0.9 * untrained, (untrained, after)


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    """Of a checkpoint as they were before torchrun training, too: without world_size and log_every."""
    cfg, root, _ = trained
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    resumed = replace(cfg, run_dir=str(tmp_path / "run"), weights_dir=str(tmp_path / "weights"), epochs=3)
    before = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    older = {k: v for k, v in before.items() if k != "world_size"}
    older["config"] = {k: v for k, v in before["config"].items() if k != "log_every"}
    torch.save(older, tmp_path / "run" / "checkpoint.pt")
    train(resumed, resume=True, progress=False)

    rows = epoch_rows(tmp_path / "run")
    assert [(r["epoch"], r["step"], r["images"]) for r in rows] == [(1, 8, 512), (2, 16, 1024), (3, 24, 1536)]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"], state["images_seen"], state["ema_updates"]) == (3, 24, 1536, 24)
    assert state["elapsed"] > before["elapsed"]
    # AdamW's own step counter went on from 16: the optimizer state was restored, not rebuilt.
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {24.0}
    assert (tmp_path / "run" / "samples_epoch003.png").exists()
    record = load_weights(tmp_path / "weights" / "tiny.safetensors").card["training"]
    assert (record["epochs"], record["images_seen"], record["world_size"]) == (3, 1536, 1)


def test_resume_refuses_a_checkpoint_of_another_network(trained, tmp_path):
    cfg, root, _ = trained
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    other = replace(cfg, run_dir=str(tmp_path / "run"), unet=replace(TINY, base_channels=16), epochs=3)
    with pytest.raises(ValueError, match="different UNetConfig"):
        train(other, resume=True, progress=False)


def test_the_time_budget_ends_training_cleanly_and_still_exports(tiny_train_config, tmp_path):
    # 0.003 min = 0.18 s: over after the first step or two of the first of 50 epochs.
    cfg = tiny_train_config(tmp_path, epochs=50, max_minutes=0.003)
    card_path = train(cfg, progress=False)
    loaded = load_weights(Path(cfg.weights_dir) / "tiny.safetensors")
    assert card_path.exists() and loaded.card["name"] == "tiny"
    record = loaded.card["training"]
    assert record["epochs"] == 1 and 1 <= record["steps"] < STEPS_PER_EPOCH
    assert record["config"]["max_minutes"] == 0.003
    assert [r["epoch"] for r in epoch_rows(tmp_path / "run")] == [1]
    assert torch.isfinite(torch.tensor(record["final_val_loss"]))
    assert not leftovers(tmp_path)


def test_cli_flags_reach_the_config():
    cfg, args = parse_args(
        [
            "--data-dir",
            "d",
            "--run-dir",
            "r",
            "--weights-dir",
            "w",
            "--name",
            "n",
            "--epochs",
            "3",
            "--max-minutes",
            "1.5",
            "--batch-size",
            "32",
            "--train-limit",
            "100",
            "--val-size",
            "50",
            "--prediction",
            "eps",
            "--schedule",
            "linear",
            "--min-snr-gamma",
            "0",
            "--base-channels",
            "16",
            "--channel-mults",
            "1",
            "2",
            "2",
            "--attention-stages",
            "--stem-patch",
            "1",
            "--groups",
            "4",
            "--log-every",
            "1",
            "--sample-steps",
            "3",
            "--resume",
        ]
    )
    assert (cfg.data_dir, cfg.run_dir, cfg.weights_dir, cfg.name) == ("d", "r", "w", "n")
    assert (cfg.epochs, cfg.max_minutes, cfg.batch_size, cfg.train_limit, cfg.val_size) == (3, 1.5, 32, 100, 50)
    assert (cfg.prediction, cfg.schedule, cfg.min_snr_gamma) == ("eps", "linear", None)
    assert cfg.unet == replace(
        UNetConfig(), base_channels=16, channel_mults=(1, 2, 2), attention_stages=(), stem_patch=1, groups=4
    )
    assert (cfg.log_every, cfg.sample_steps) == (1, 3)
    assert args.resume


def test_every_config_field_is_a_flag_and_the_config_round_trips():
    assert parse_args([])[0] == TrainConfig()  # the defaults are the dataclass's
    cfg, args = parse_args(
        ["--T", "500", "--weight-decay", "0.01", "--min-lr-ratio", "0.1", "--grad-clip", "2", "--sample-guidance", "1"]
        + ["--attention-heads", "2", "--ema-extra", "0.9", "0.99", "--channels-last", "--compile"]
        + ["--export-only", "--export-ema", "0.9", "--no-progress"]
    )
    assert cfg == replace(
        TrainConfig(),
        T=500,
        weight_decay=0.01,
        min_lr_ratio=0.1,
        grad_clip=2.0,
        sample_guidance=1.0,
        unet=replace(UNetConfig(), attention_heads=2),
        ema_extra=(0.9, 0.99),
        channels_last=True,
        compile=True,
    )
    assert (args.export_only, args.export_ema, args.no_progress, args.resume) == (True, 0.9, True, False)
    # A config written out as flags, field by field (the network's too), parses back to itself.
    fixed = ("image_size", "in_channels", "num_classes", "extra")
    fields = {**{k: v for k, v in asdict(cfg).items() if k != "unet"}, **asdict(cfg.unet)}
    argv = []
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        elif value is not None and key not in fixed:
            argv += [flag, str(value)]
    assert parse_args(argv)[0] == cfg
    for name in ("image_size", "in_channels", "num_classes"):  # fixed by the data: no flag
        with pytest.raises(SystemExit):
            parse_args([f"--{name.replace('_', '-')}", "1"])


def test_a_warm_start_keeps_extra_emas_and_records_the_earlier_training(trained, tiny_train_config, tmp_path):
    """--init-from starts from earlier weights (the card then records that training and the total
    time), extra EMA decays are kept and exportable by decay, and a bfloat16 run trains."""
    cfg, _, card_path = trained
    earlier = json.loads(Path(card_path).read_text())["training"]
    start = load_weights(Path(card_path).with_suffix(".safetensors")).model.state_dict()
    warm = replace(
        tiny_train_config(tmp_path, epochs=1),
        init_from=str(Path(card_path).with_suffix(".safetensors")),
        ema_extra=(0.1, 0.99),
        precision="bfloat16",
        lr_schedule="rsqrt",
        rsqrt_ref_steps=4,
    )
    card = json.loads(train(warm, progress=False).read_text())
    record = card["training"]
    assert record["initialised_from"]["training"]["images_seen"] == earlier["images_seen"]
    assert record["total_wall_minutes"] == pytest.approx(record["wall_minutes"] + earlier["wall_minutes"], abs=0.02)
    state = torch.load(Path(warm.run_dir) / "checkpoint.pt", weights_only=True)
    assert set(state["ema_extra"]) == {"0.1", "0.99"}

    # A warm start has no initialisation to forget, so no EMA warm-up: each decay is its own from the
    # first step, and the shorter the EMA the further it followed the weights away from the start.
    def drift(ema: dict) -> float:
        return max((ema[k] - v).abs().max().item() for k, v in start.items())

    assert drift(state["ema_extra"]["0.1"]) > drift(state["ema_extra"]["0.99"]) > drift(state["ema"]) > 0
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in epoch_rows(Path(warm.run_dir)))
    out = export(replace(warm, name="short"), Path(warm.run_dir) / "checkpoint.pt", ema_decay=0.1)
    short = load_weights(out.with_suffix(".safetensors")).model.state_dict()
    assert all(torch.equal(short[k], state["ema_extra"]["0.1"][k]) for k in short)
    assert json.loads(out.read_text())["training"]["exported_ema_decay"] == 0.1
    raw = export(replace(warm, name="raw"), Path(warm.run_dir) / "checkpoint.pt", ema_decay=0)
    weights = load_weights(raw.with_suffix(".safetensors")).model.state_dict()
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)
    assert json.loads(raw.read_text())["training"]["exported_ema_decay"] == 0
    with pytest.raises(ValueError, match="keeps no EMA with decay 0.7; allowed: 0.999, 0.1, 0.99, 0 .the raw weights."):
        export(warm, Path(warm.run_dir) / "checkpoint.pt", ema_decay=0.7)


def test_a_warm_start_takes_a_card_written_before_a_field_existed(trained, tiny_train_config, tmp_path):
    """The shipped teacher's card predates ``full_res_channels``: its network has the default, so a
    run of the same architecture starts from it."""
    _, _, card_path = trained
    old = tmp_path / "old"
    old.mkdir()
    weights = old / "net.safetensors"
    shutil.copy(Path(card_path).with_suffix(".safetensors"), weights)
    card = json.loads(Path(card_path).read_text())
    del card["unet"]["full_res_channels"]
    weights.with_suffix(".json").write_text(json.dumps(card))
    warm = replace(tiny_train_config(tmp_path / "run", epochs=1), init_from=str(weights))
    assert read_card(train(warm, progress=False))["training"]["initialised_from"]["weights"] == "net.safetensors"


def test_a_warm_start_from_another_architecture_is_refused(trained, tiny_train_config, tmp_path):
    _, _, card_path = trained
    other = replace(TINY, base_channels=16)
    cfg = tiny_train_config(tmp_path, unet=other, init_from=str(Path(card_path).with_suffix(".safetensors")))
    with pytest.raises(ValueError, match="UNetConfig .* differs from this run's"):
        train(cfg, progress=False)


def test_the_rsqrt_schedule_warms_up_then_decays_as_the_inverse_square_root():
    cfg = TrainConfig(warmup_steps=10, lr_schedule="rsqrt", rsqrt_ref_steps=100)
    assert lr_factor(0.0, 4, cfg) == pytest.approx(0.5)
    assert lr_factor(0.9, 50, cfg) == 1.0  # no end point: progress does not matter
    assert lr_factor(0.0, 399, cfg) == pytest.approx(0.5)  # sqrt(100 / 400)


def test_a_cooldown_ends_the_rsqrt_schedule_with_a_linear_decay_to_zero():
    cfg = TrainConfig(warmup_steps=10, lr_schedule="rsqrt", rsqrt_ref_steps=100, cooldown_steps=200)
    assert lr_factor(0.0, 399, cfg, total_steps=1000) == pytest.approx(0.5)  # before the cooldown
    assert lr_factor(0.0, 899, cfg, total_steps=1000) == pytest.approx(math.sqrt(100 / 900) * 0.505)
    assert lr_factor(0.0, 1000, cfg, total_steps=1000) == 0.0
    assert lr_factor(0.0, 899, cfg) == pytest.approx(math.sqrt(100 / 900))  # no end given, no cooldown
