"""model/distributed.py and training under torchrun: two CPU ranks (gloo) against one process.

The module's fixture trains a tiny network for the same 3 epochs (24 steps of a global batch of 32)
twice: in this process, and with torchrun as two ranks of 16 images each. The tests compare the two
runs, check what the ranks wrote, and resume each run's checkpoint in the other mode. About 20 s on two
busy CPU cores, most of it spent starting torchrun's processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model.distributed import World
from model.io import load_weights
from model.teacher import TrainConfig
from model.train import main, parse_args, train
from model.unet import tiny_config
from testkit.servers import free_port

REPO = Path(__file__).resolve().parents[2]
EPOCHS, STEPS_PER_EPOCH, BATCH = 3, 8, 32  # 256 images / batch 32


def argv(data_dir: Path, root: Path, epochs: int = EPOCHS, *extra: str) -> list[str]:
    """model.train's command line for a run in ``root``, logging every step."""
    return [
        *("--data-dir", str(data_dir), "--run-dir", str(root / "run"), "--weights-dir", str(root / "weights")),
        *("--name", "tiny", "--base-channels", "8", "--channel-mults", "1", "2", "--attention-stages", "--groups", "4"),
        *("--epochs", str(epochs), "--batch-size", str(BATCH), "--train-limit", "256", "--val-size", "200"),
        *("--lr", "6e-3", "--warmup-steps", "2", "--sample-steps", "2", "--device", "cpu", "--threads", "1"),
        *("--log-every", "1", "--no-progress", *extra),
    ]


def torchrun(args: list[str]) -> str:
    """``torchrun --nproc-per-node 2 -m model.train ARGS`` on the CPU; returns what the ranks printed."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    done = subprocess.run(
        [*launcher, *rendezvous, "-m", "model.train", *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def in_process(args: list[str]) -> None:
    """``python -m model.train ARGS``, run here (its --threads 1 is undone afterwards)."""
    threads = torch.get_num_threads()
    try:
        main(args)
    finally:
        torch.set_num_threads(threads)


def metrics(root: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def checkpoint(root: Path) -> dict:
    return torch.load(root / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(fashion_mnist_dir, tmp_path_factory) -> SimpleNamespace:
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_ranks")
    assert parse_args(argv(fashion_mnist_dir, one))[0].unet == tiny_config()
    in_process(argv(fashion_mnist_dir, one))
    printed = torchrun(argv(fashion_mnist_dir, two))
    return SimpleNamespace(data=fashion_mnist_dir, one=one, two=two, printed=printed)


def test_two_ranks_train_as_one_process_does_with_the_same_global_batch(runs):
    one, two = metrics(runs.one, "train"), metrics(runs.two, "train")
    assert [(r["step"], r["images"]) for r in two] == [(s, BATCH * s) for s in range(1, EPOCHS * STEPS_PER_EPOCH + 1)]
    assert [(r["step"], r["images"]) for r in one] == [(r["step"], r["images"]) for r in two]
    loss_one, loss_two = [r["batch_loss"] for r in one], [r["batch_loss"] for r in two]
    assert max(loss_one) - min(loss_one) > 0.05  # the losses moved: the runs are not compared on constants
    # Measured: at most 1.3e-7 apart, relative, over these 24 steps (validation losses equal, EMA weights
    # 2.2e-6 apart where the largest is 3.7): float32 rounding, as convolutions over 16 rows add up in
    # another order than over 32 and gloo sums the two ranks' gradients; AdamW's division by sqrt(v) lets
    # that reach the weights. 1e-5 leaves a margin of 75 for other CPUs' kernels, and a broken split is
    # further off from the first or second step: both ranks on the same rows 0.28 at step 1, each rank
    # drawing its own noise 0.05 at step 1, gradients not averaged over the ranks 4e-5 at step 2 and 2e-3
    # at step 3 (EMA weights 0.07 apart in all three).
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    val_one, val_two = ([r["val_loss"] for r in metrics(root, "epoch")] for root in (runs.one, runs.two))
    assert val_two == pytest.approx(val_one, rel=1e-5)
    ema_one, ema_two = checkpoint(runs.one)["ema"], checkpoint(runs.two)["ema"]
    assert max((ema_one[k] - ema_two[k]).abs().max().item() for k in ema_one) < 1e-4


def test_rank_0_alone_writes_one_set_of_files(runs):
    run = runs.two / "run"
    grids = [f"samples_epoch{e:03d}.png" for e in range(1, EPOCHS + 1)]
    assert sorted(p.name for p in run.iterdir()) == sorted(["checkpoint.pt", "loss_curve.png", "metrics.jsonl", *grids])
    assert sorted(p.name for p in (runs.two / "weights").iterdir()) == ["tiny.json", "tiny.safetensors"]
    # One line per step and per epoch: a second writer would have added its own.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == EPOCHS * STEPS_PER_EPOCH + EPOCHS
    assert [r["epoch"] for r in metrics(runs.two, "epoch")] == [1, 2, 3]
    printed = runs.printed.splitlines()
    assert [line.split(":")[0] for line in printed if line.startswith("epoch ")] == ["epoch 1", "epoch 2", "epoch 3"]
    assert sum(line.startswith("exported ") for line in printed) == 1
    assert sum(line.startswith("UNet ") and "2 ranks x 16 images per step" in line for line in printed) == 1

    two = load_weights(runs.two / "weights" / "tiny.safetensors").card["training"]
    one = load_weights(runs.one / "weights" / "tiny.safetensors").card["training"]
    assert (two["world_size"], two["per_rank_batch_size"], two["batch_size"]) == (2, 16, BATCH)
    assert (one["world_size"], one["per_rank_batch_size"], one["batch_size"]) == (1, BATCH, BATCH)
    assert (two["epochs"], two["steps"], two["images_seen"]) == (EPOCHS, 24, 768)


def test_a_checkpoint_resumes_in_the_other_mode(runs, tmp_path):
    """torchrun's checkpoint resumed by one process, and one process's resumed by two ranks (these in
    channels-last bfloat16): the counts, AdamW and the EMAs go on from step 24, and so does training."""
    two_then_one, one_then_two = tmp_path / "two_then_one", tmp_path / "one_then_two"
    shutil.copytree(runs.two, two_then_one)
    shutil.copytree(runs.one, one_then_two)
    in_process(argv(runs.data, two_then_one, EPOCHS + 1, "--resume"))
    printed = torchrun(
        argv(runs.data, one_then_two, EPOCHS + 1, "--resume", "--channels-last", "--precision", "bfloat16")
    )
    assert sum(line.startswith(f"resumed {one_then_two}") for line in printed.splitlines()) == 1

    for root, before, world_size in ((two_then_one, runs.two, 1), (one_then_two, runs.one, 2)):
        epochs = [(r["epoch"], r["step"], r["images"]) for r in metrics(root, "epoch")]
        assert epochs == [(e, STEPS_PER_EPOCH * e, BATCH * STEPS_PER_EPOCH * e) for e in range(1, EPOCHS + 2)]
        assert [r["step"] for r in metrics(root, "train")] == list(range(1, (EPOCHS + 1) * STEPS_PER_EPOCH + 1))
        state, earlier = checkpoint(root), checkpoint(before)
        counts = (state["step"], state["images_seen"], state["ema_updates"], state["world_size"])
        assert counts == (32, 1024, 32, world_size)
        assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {32.0}  # AdamW went on from 24
        moved = [not torch.equal(state["model"][k], earlier["model"][k]) for k in ("out_conv.weight", "out_conv.bias")]
        assert all(moved)
        record = load_weights(root / "weights" / "tiny.safetensors").card["training"]
        assert (record["epochs"], record["images_seen"], record["world_size"]) == (EPOCHS + 1, 1024, world_size)

    # Both resumes start from (all but) the same weights and draw the same noise for steps 25-32, so the
    # bfloat16 ranks' losses follow the float32 process's within bfloat16's rounding (measured: at most
    # 1.6e-4 apart, relative), and further apart than float32 alone would be (1.3e-7 above): autocast was on.
    fp32, bf16 = (
        [r["batch_loss"] for r in metrics(root, "train")[-STEPS_PER_EPOCH:]] for root in (two_then_one, one_then_two)
    )
    assert bf16 == pytest.approx(fp32, rel=2e-3)
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16, strict=True)) > 1e-6


def test_the_world_is_what_torchrun_says():
    assert World.from_env({}) == World(rank=0, size=1, local_rank=0, launched=False)
    world = World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.launched, world.is_main) == (3, 4, 1, True, False)
    with pytest.raises(ValueError, match="found only RANK, WORLD_SIZE"):
        World.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK must be in 0..1, got 2"):
        World.from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_each_rank_takes_its_own_rows_of_the_global_batch():
    rows = torch.arange(12)
    parts = [World(rank, 3, rank, launched=True).part(rows) for rank in range(3)]
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="--batch-size 12 does not divide among 5 ranks; use a multiple of 5"):
        World(0, 5, 0, launched=True).per_rank_batch(12)


def test_each_rank_runs_on_its_local_gpu_and_an_explicit_one_is_refused():
    world = World(1, 2, 1, launched=True)
    assert world.device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="each rank uses cuda:LOCAL_RANK"):
        world.device(torch.device("cuda", 0))
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="local rank 1 has no GPU"):
            world.device(torch.device("cuda"))
    else:
        assert world.device(torch.device("cuda")) == torch.device("cuda", 1)


def test_training_under_torchrun_refuses_a_batch_that_does_not_divide(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), batch_size=32, device="cpu")
    with pytest.raises(ValueError, match="--batch-size 32 does not divide among 3 ranks"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before writing or joining anything
