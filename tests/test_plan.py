"""train.py --plan: the fake-tensor estimate of one step's peak memory against the same two steps
on real (random) tensors, tiny presets; and the plan reads no weight file."""
import pytest

import train
from oracle import tiny_blip
from test_train import PROMPTS


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_plan_estimate_matches_measured_peak(model, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    # fp32: CPU has no bf16 antialiased bicubic (the captioner's resize); the bytes scale alike
    args = ["--model", model, "--prompts", str(tmp_path / "p.txt"), "--size", "64",
            "--captioner", tiny_blip(str(tmp_path / "blip")), "--total_steps", "8",
            "--grad_steps", "2", "--rank", "8", "--batch", "2", "--precision", "fp32"]
    est = train.main(args + ["--plan", "fake"])
    real = train.main(args + ["--plan", "real"])
    assert est["weights"] == pytest.approx(real["weights"], rel=1e-6)  # same models, same bytes
    assert est["optimiser"] == pytest.approx(real["optimiser"], rel=1e-6)
    # the stated tolerance (README "What fits where"): 5 % of the peak
    assert est["peak"] == pytest.approx(real["peak"], rel=0.05)
    assert est["flops"] == pytest.approx(real["flops"], rel=1e-6)  # FLOPs follow from shapes


def test_plan_needs_no_weights(tmp_path):
    (tmp_path / "p.txt").write_text("a red cat\n")
    r = train.main(["--model", "tiny", "--prompts", str(tmp_path / "p.txt"), "--size", "32",
                    "--captioner", tiny_blip(str(tmp_path / "blip")), "--total_steps", "4",
                    "--grad_steps", "2", "--batch", "1", "--plan", "fake",
                    "--out", str(tmp_path / "never")])
    assert r["peak"] > r["weights"] > 0 and r["flops"] > 0
    assert not (tmp_path / "never").exists()  # nothing written where the run would write
