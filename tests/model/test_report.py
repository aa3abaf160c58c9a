"""The frontier of several evaluations: runs grouped by kind of guidance, drawn and tabled."""

import json

from PIL import Image

from model.report import frontier_lines, main


def run(guidance, guide=None, interval=None, ratio=5.0, weights="fashion-unet", guide_weight=1.0, sampler=None):
    pr = {"k": 3, "precision": 0.9, "recall": 0.7, "precision_real_train": 0.86, "recall_real_train": 0.84}
    return {
        "weights": weights,
        "guide_weight": guide_weight,
        **(sampler or {"sampler": "dpm++", "steps": 20}),
        "guidance": guidance,
        "guidance_interval": interval,
        "guide": guide,
        "accuracy": 0.9 + guidance / 100,
        "frechet_distance": ratio / 10,
        "frechet_ratio": ratio,
        "precision_recall": pr,
    }


def test_runs_group_by_kind_of_guidance_in_order_of_scale_and_the_unguided_run_ends_every_line():
    runs = [run(2.0), run(1.5), run(2.0, guide="g24"), run(1.0), run(2.0, interval=[0.3, 5.0])]
    runs.append(run(1.35, guide="g24", guide_weight=1.5))
    lines = frontier_lines(runs)
    assert list(lines) == [
        "classifier-free",
        "autoguidance (g24)",
        "classifier-free for 0.3 < sigma <= 5",
        "classifier-free plus g24 at 1.5",
    ]
    assert [r["guidance"] for r in lines["classifier-free plus g24 at 1.5"]] == [1.0, 1.35]
    assert [r["guidance"] for r in lines["classifier-free"]] == [1.0, 1.5, 2.0]
    assert [r["guidance"] for r in lines["autoguidance (g24)"]] == [1.0, 2.0]
    assert frontier_lines([run(1.0)]) == {"no guidance": [run(1.0)]}


def test_several_networks_get_a_line_each_named_and_each_unguided_run_ends_only_its_own_lines():
    runs = [run(1.35), run(1.0), run(1.6, weights="fashion-unet-ln"), run(1.0, weights="student")]
    lines = frontier_lines(runs)
    assert list(lines) == [
        "fashion-unet: classifier-free",
        "fashion-unet-ln: classifier-free",
        "student: no guidance",
    ]
    assert [r["guidance"] for r in lines["fashion-unet: classifier-free"]] == [1.0, 1.35]
    assert [r["guidance"] for r in lines["fashion-unet-ln: classifier-free"]] == [1.6]
    assert lines["student: no guidance"] == [run(1.0, weights="student")]


def test_several_samplers_get_a_line_each_and_the_unguided_run_ends_only_its_samplers():
    heun = {"sampler": "heun", "steps": 18, "sigma_min": 0.09}
    runs = [run(1.35), run(1.0), run(1.35, sampler=heun), run(1.6, sampler=heun)]
    lines = frontier_lines(runs)
    assert list(lines) == ["dpm++ 20 steps: classifier-free", "heun 18 steps to sigma 0.09: classifier-free"]
    assert [r["guidance"] for r in lines["dpm++ 20 steps: classifier-free"]] == [1.0, 1.35]
    assert [r["guidance"] for r in lines["heun 18 steps to sigma 0.09: classifier-free"]] == [1.35, 1.6]


def test_the_cli_tables_the_runs_and_draws_their_frontier(tmp_path, capsys):
    screens = tmp_path / "a.json"
    runs = [run(1.35), run(2.0, guide="g24", ratio=3.0), run(1.0, weights="student")]
    screens.write_text(json.dumps([*runs, run(1.35, guide="g24", guide_weight=1.5)]))
    out = tmp_path / "frontier.png"
    assert main([str(screens), "--plot", str(out), "--title", "val, 100 per class"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| fashion-unet | dpm++ | 20 | 40 | 1.35 |") and "| 1.00x |" in table[2]
    assert "| 2, autoguided by g24 |" in table[3] and "| 0.60x |" in table[3]
    assert table[4].startswith("| student |")
    assert table[5].startswith("| fashion-unet | dpm++ | 20 | 60 | 1.35 plus g24 at 1.5 |")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 300
