"""The frontier of several evaluations: runs grouped by kind of guidance, drawn and tabled."""

import json

from PIL import Image

from model.report import frontier_lines, main


def run(guidance, guide=None, interval=None, ratio=5.0, weights="fashion-unet"):
    pr = {"k": 3, "precision": 0.9, "recall": 0.7, "precision_real_train": 0.86, "recall_real_train": 0.84}
    return {
        "weights": weights,
        "sampler": "dpm++",
        "steps": 20,
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
    lines = frontier_lines(runs)
    assert list(lines) == ["classifier-free", "autoguidance (g24)", "classifier-free for 0.3 < sigma <= 5"]
    assert [r["guidance"] for r in lines["classifier-free"]] == [1.0, 1.5, 2.0]
    assert [r["guidance"] for r in lines["autoguidance (g24)"]] == [1.0, 2.0]
    assert frontier_lines([run(1.0)]) == {"no guidance": [run(1.0)]}


def test_the_cli_tables_the_runs_and_draws_the_frontier_of_the_first_network(tmp_path, capsys):
    screens = tmp_path / "a.json"
    screens.write_text(json.dumps([run(1.35), run(2.0, guide="g24", ratio=3.0), run(1.0, weights="student")]))
    out = tmp_path / "frontier.png"
    assert main([str(screens), "--plot", str(out), "--title", "val, 100 per class"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| fashion-unet | dpm++ | 20 | 40 | 1.35 |") and "| 1.00x |" in table[2]
    assert "| 2, autoguided by g24 |" in table[3] and "| 0.60x |" in table[3]
    assert table[4].startswith("| student |")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 300
