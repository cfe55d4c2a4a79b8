"""viz.py: the loss curve and the labelled sample grids are drawn (PIL only) at readable sizes."""
import math

import torch
from PIL import Image

import viz


def test_loss_curve_panels_and_edge_cases(tmp_path):
    rows = [{"step": s, "loss": 2 - s / 100 + (s % 3) * 0.1, "cap": 1.0, "d": math.nan}
            for s in range(1, 51)]
    viz.loss_curve(rows, str(tmp_path / "loss.png"))
    img = Image.open(tmp_path / "loss.png")
    assert img.size == (720, 3 * 170)  # loss, cap (flat), d (no finite value): one panel each
    viz.loss_curve(rows[:1], str(tmp_path / "one.png"))  # a single logged step still draws
    assert viz.ema([1.0, 1.0, 4.0], 0.5) == [1.0, 1.0, 1.0 + 3 * 0.5 / (1 - 0.125)]


def test_labelled_grid_upscales_tiles_and_writes_labels(tmp_path):
    images = torch.zeros(3, 3, 64, 64)
    images[:, 0] = 1  # red tiles
    viz.labelled_grid([("base", images), ("fine-tuned, step 300", images)],
                      ["a red circle to the left of a blue square", "a cat", "a dog"],
                      str(tmp_path / "g.png"))
    img = Image.open(tmp_path / "g.png").convert("RGB")
    assert img.width == 150 + 3 * (128 + 4) and img.height > 2 * (128 + 4)
    assert img.getpixel((150 + 64, 64)) == (255, 0, 0)  # a 64 px tile drawn at 128 px
    label = img.crop((0, 0, 150, 2 * 132))
    prompts = img.crop((150, 2 * 132, img.width, img.height))
    assert min(label.getdata()) < (100, 100, 100) and min(prompts.getdata()) < (100, 100, 100)
