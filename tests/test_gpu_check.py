"""bench/gpu_check.py, the script a lent GPU runs, on the CPU at tiny sizes so that it cannot rot:
our UNet equals diffusers' on the same weights, a real bf16 step's tracked peak equals the plan's,
and the JSON and Markdown files are written."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import gpu_check  # noqa: E402


def test_gpu_check_runs_tiny_on_the_cpu(tmp_path):
    unet_rows, step_rows = gpu_check.main(["--device", "cpu", "--tiny",
                                           "--out", str(tmp_path / "gc")])
    saved = json.loads((tmp_path / "gc.json").read_text())
    assert saved["steps"] == step_rows and len(saved["unet"]) == 2
    assert "| training step |" in (tmp_path / "gc.md").read_text()
    for r in unet_rows:  # same weights, same maths; the LoRA (B = 0) changes nothing yet
        assert r["maxdiff_fp32"] < 1e-4 and r["maxdiff_bf16"] < 0.1
        assert r["ours_s"] > 0 and r["diffusers_s"] > 0
    (step,) = step_rows
    assert step["measured_over_planned"] == pytest.approx(1.0, abs=0.05)  # README's tolerance
    assert step["largest_batch"] == 2 and step["sec_per_step"] > 0
