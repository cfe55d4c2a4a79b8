"""train.py end to end on tiny random models (BLIP, Grounding-DINO, SAM, UNet): checkpoints that
sample.py loads, exact resume, two processes = one with the combined batch, and bad input."""
import json
import math
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from oracle import tiny_blip, tiny_grounded_sam
from safetensors.torch import load_file

import sample
import train
from captioner import load_captioner
from unet import merge_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cat and a blue dog", "a green circle on the left of a red square", "a blue dog",
           "a red square above a green circle"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    gd, sam = tiny_grounded_sam(str(d))
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"dir": d, "args": ["--model", "tiny", "--prompts", str(d / "prompts.txt"),
                               "--captioner", tiny_blip(str(d / "blip")),
                               "--dino", gd, "--sam", sam,
                               "--size", "32", "--total_steps", "4", "--grad_steps", "2",
                               "--rank", "4", "--batch", "2"]}


def run(world, out, *extra):
    train.main(world["args"] + ["--out", str(out), *extra])
    return load_file(os.path.join(out, "lora.safetensors"))


def test_two_steps_write_what_sample_loads(world, tmp_path):
    lora = run(world, tmp_path / "run", "--steps", "2", "--every", "2")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # the LoRA moved
    for f in ("ckpt-2/lora.safetensors", "ckpt-2/disc.safetensors", "ckpt-2/state.pt", "latest",
              "log.jsonl", "loss.png", "samples-000002.png", "real_latents.safetensors",
              "before_after.png"):
        assert (tmp_path / "run" / f).exists(), f
    rows = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all(k in rows[0] for k in ('"cap"', '"tok"', '"pix"', '"adv"'))
    out = tmp_path / "s.png"
    sample.main(["a red cat", "--model", "tiny", "--steps", "2",
                 "--lora", str(tmp_path / "run" / "lora.safetensors"),
                 "--out", str(out)])
    assert out.exists()


def test_resume_is_exact(world, tmp_path):
    straight = run(world, tmp_path / "a", "--steps", "4", "--every", "2")
    run(world, tmp_path / "b", "--steps", "2", "--every", "2")
    resumed = run(world, tmp_path / "b", "--steps", "4", "--every", "2", "--resume")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    da, db = (load_file(tmp_path / r / "ckpt-4" / "disc.safetensors") for r in ("a", "b"))
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_two_processes_equal_one_with_the_combined_batch(world, tmp_path):
    args = world["args"] + ["--steps", "2", "--every", "2", "--sampler", "ddim"]
    one = run(world, tmp_path / "one", "--steps", "2", "--every", "2", "--sampler", "ddim",
              "--batch", "2")
    two = [a if a != "2" or args[i - 1] != "--batch" else "1" for i, a in enumerate(args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", os.path.join(ROOT, "train.py"), *two,
           "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]  # includes the ranks' weight-equality check
    two = load_file(tmp_path / "two" / "lora.safetensors")
    # Adam's update is about lr (5e-5) per step whatever the gradient's size, so all-reduce
    # rounding shows up at ~1e-6; a tenth of one step is the bar, and B moved far past it.
    assert max(v.abs().max() for k, v in one.items() if "lora_B" in k) > 5e-5
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=5e-6)


@pytest.mark.parametrize("text", [None, "", "\n  \n\n"])
def test_bad_prompt_files(world, tmp_path, text):
    path = tmp_path / "p.txt"
    if text is not None:
        path.write_text(text)
    args = world["args"] + ["--prompts", str(path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="error: prompts file"):
        train.main(args)


def test_unparseable_and_over_long_prompts_warn(world, tmp_path):
    (tmp_path / "p.txt").write_text("the sky at night\n" + "a very long prompt " * 30 + "\n")
    with pytest.warns(UserWarning) as caught:
        run(world, tmp_path / "o", "--prompts", str(tmp_path / "p.txt"), "--steps", "1")
    text = " ".join(str(w.message) for w in caught)
    assert "no prompt has a parseable object" in text and "truncated" in text


def test_non_finite_losses_skip_then_stop_with_a_checkpoint(world, tmp_path):
    with pytest.warns(UserWarning, match="non-finite loss, step skipped"):
        with pytest.raises(SystemExit, match="2 non-finite losses in a row; checkpoint saved"):
            run(world, tmp_path / "o", "--steps", "5", "--w_cap", "nan", "--max_nan", "2")
    assert (tmp_path / "o" / "latest").read_text() == "ckpt-1"


def test_interrupted_save_leaves_the_last_checkpoint_usable(world, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def dying_save(*a, **k):  # the run is killed while writing its second checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*a, **k)
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "o", "--steps", "3", "--every", "1")
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "o" / "latest").read_text() == "ckpt-1"
    assert not (tmp_path / "o" / "ckpt-2").exists()  # only a .tmp folder, never a half checkpoint
    run(world, tmp_path / "o", "--steps", "3", "--every", "1", "--resume")
    assert (tmp_path / "o" / "latest").read_text() == "ckpt-3"


def test_full_finetune_export_and_jsonl_objects(world, tmp_path):
    rows = ['{"prompt": "a red cat and a blue dog", "objects": [["red", "cat"], ["dog"]]}',
            '{"prompt": "a green circle"}']
    (tmp_path / "p.jsonl").write_text("\n".join(rows) + "\n")
    args = world["args"] + ["--prompts", str(tmp_path / "p.jsonl"), "--steps", "1"]
    train.main(args + ["--rank", "0", "--out", str(tmp_path / "full")])
    full = tmp_path / "full" / "unet.safetensors"
    sample.main(["a red cat", "--model", "tiny", "--unet", str(full), "--steps", "2",
                 "--out", str(tmp_path / "a.png")])
    train.main(args + ["--export", "--out", str(tmp_path / "lora")])
    plain = load_file(tmp_path / "lora" / "unet.safetensors")
    assert not any("lora" in k for k in plain)  # folded: diffusers' plain UNet keys
    pipe = sample.load("tiny")
    merge_lora(pipe.unet, load_file(tmp_path / "lora" / "lora.safetensors"))
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(plain[k], v)


def test_sdxl_like_model_trains(world, tmp_path):
    lora = run(world, tmp_path / "xl", "--model", "tiny-sdxl", "--steps", "1")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    cfg = train.parse(["--model", "tiny-sdxl", "--lr", "1e-4"])
    assert cfg.lr == 1e-4 and cfg.lr_d == 5e-5 and cfg.batch == 6  # SDXL's preset fills the rest


def test_help_shows_each_field_and_the_value_the_run_uses(capsys):
    """--help: every TrainConfig field with its comment and the value for the chosen --model:
    the toy model's own preset (toy/model/comat.json), SDXL's, or TrainConfig's defaults."""
    def help_of(*argv):
        with pytest.raises(SystemExit):
            train.parse([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    toy = help_of()
    assert "optimizer steps (official 2000) (default: 300)" in toy
    assert "constant (official SD1.5 5e-5, SDXL 2e-5) (default: 0.0003)" in toy
    assert "adversarial term (official SDXL 0.5) (default: 0.03)" in toy
    assert "(default: 'shapes')" in toy
    for f in fields(train.TrainConfig):  # every field documented
        assert f"--{f.name}" in toy
    assert "(default: 2e-05)" in help_of("--model", "tiny-sdxl")
    assert "optimizer steps (official 2000) (default: 2000)" in help_of("--model", "tiny")
    cfg = train.parse([])  # what the default run uses is what --help said
    assert (cfg.steps, cfg.lr, cfg.w_adv, cfg.segmenter) == (300, 3e-4, 0.03, "shapes")


class Payload:  # what a hostile checkpoint could carry: unpickling it would call `touch`
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_pickled_object_in_state_pt(world, tmp_path):
    run(world, tmp_path / "o", "--steps", "1", "--every", "1")
    state = tmp_path / "o" / "ckpt-1" / "state.pt"
    st = torch.load(state, weights_only=True)  # what train.py writes loads without pickle
    marker = tmp_path / "ran"
    torch.save({**st, "extra": Payload(str(marker))}, state)
    with pytest.raises(SystemExit, match="state.pt holds a pickled object .*refused"):
        run(world, tmp_path / "o", "--steps", "2", "--resume")
    assert not marker.exists()  # the payload never ran


@pytest.mark.parametrize("damage", [lambda b: b[:100], lambda b: b"garbage" * 10])
def test_resume_names_a_damaged_state_pt(world, tmp_path, damage):
    run(world, tmp_path / "o", "--steps", "1", "--every", "1")
    state = tmp_path / "o" / "ckpt-1" / "state.pt"
    state.write_bytes(damage(state.read_bytes()))
    with pytest.raises(SystemExit) as e:
        run(world, tmp_path / "o", "--steps", "2", "--resume")
    assert str(e.value).startswith(f"error: {state} is damaged") and "\n" not in str(e.value)
    assert "pickled object" not in str(e.value) and "ckpt-* by writing its name" in str(e.value)


def test_wrong_captioner_folder_and_unwritable_out(world, tmp_path):
    vqa = os.path.join(ROOT, "toy", "model", "vqa")
    with pytest.raises(SystemExit, match=f"^error: {vqa}: a BlipForQuestionAnswering checkpoint; "
                       "--captioner .BLIP captioning. needs BlipForConditionalGeneration$"):
        run(world, tmp_path / "o", "--captioner", vqa)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=f"^error: cannot write {tmp_path}/file/o/log.jsonl"):
        run(world, tmp_path / "file" / "o")


def test_bf16_step_runs_on_the_cpu(world, tmp_path):
    """A bf16 step end to end (autocast, bf16 frozen models, fp32 LoRA), as on a GPU: the
    captioner's antialiased bicubic resize has no bf16 CPU kernel and runs in fp32."""
    lora = run(world, tmp_path / "bf", "--precision", "bf16", "--steps", "1")
    assert all(v.dtype == torch.float32 for v in lora.values())  # LoRA weights stay fp32
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    row = json.loads((tmp_path / "bf" / "log.jsonl").read_text().splitlines()[0])
    assert all(math.isfinite(row[k]) for k in ("loss", "cap", "adv", "d", "grad_norm"))


def test_shared_discriminator_trains_as_the_copy_and_resumes_exactly(world, tmp_path):
    """--disc shared (one frozen base, a second LoRA set for D) follows the copied
    discriminator's run bit for bit, and resumes exactly."""
    copied = run(world, tmp_path / "copy", "--steps", "2", "--every", "2")
    run(world, tmp_path / "shared", "--steps", "1", "--every", "1", "--disc", "shared")
    shared = run(world, tmp_path / "shared", "--steps", "2", "--every", "2", "--disc", "shared",
                 "--resume")
    assert copied.keys() == shared.keys()
    assert all(torch.equal(copied[k], shared[k]) for k in copied)
    dc, ds = (load_file(tmp_path / r / "ckpt-2" / "disc.safetensors") for r in ("copy", "shared"))
    assert set(ds) == {"head.weight", "head.bias"} | {k for k in ds if k.startswith("lora.")}
    assert sum(v.numel() for v in ds.values()) < sum(v.numel() for v in dc.values()) / 2
    assert torch.equal(dc["head.weight"], ds["head.weight"])
    with pytest.raises(SystemExit, match="--disc shared needs LoRA training"):
        run(world, tmp_path / "full", "--disc", "shared", "--rank", "0", "--steps", "1")


def test_shared_discriminator_and_generator_steps_change_only_their_own_weights(world):
    """With one optimiser's lr at 0 (AdamW then changes nothing), the other's step leaves its
    weights exactly as they were: the generator's step touches no discriminator weight and the
    discriminator's step none of the generator's, though both live on one UNet."""
    cfg = train.parse(world["args"] + ["--disc", "shared"])
    r = train.setup(cfg, sample.load("tiny"), [load_captioner(cfg.captioner)],
                    train.segmenter(cfg, "cpu"), PROMPTS, "cpu", torch.float32)
    real = torch.randn(len(PROMPTS), *r.lat_shape)
    for step, (lr, lr_d) in enumerate(((1e-3, 0.0), (0.0, 1e-3))):  # step 1: the sets differ
        r.opt.param_groups[0]["lr"], r.opt_d.param_groups[0]["lr"] = lr, lr_d
        g0, d0 = ([p.detach().clone() for p in ps] for ps in (r.params, r.d_params))
        train.update(r, train.losses(r, [0, 1], step), real, [0, 1])
        g_moved = any(not torch.equal(a, p) for a, p in zip(g0, r.params))
        d_moved = any(not torch.equal(a, p) for a, p in zip(d0, r.d_params))
        assert (g_moved, d_moved) == (lr > 0, lr_d > 0)


def test_object_loss_reads_each_object_alone(tmp_path):
    """--w_obj: each found object's pixels (mask grown by 2 px) on white, scored as its phrase,
    the gradient reaching only those pixels; an object not found is read in the rest of the
    picture (outside the found objects' grown masks; all of it when nothing is found)."""
    from captioner import caption_logprob
    from segment import Obj
    cap = load_captioner(tiny_blip(str(tmp_path / "blip")))
    cfg = train.TrainConfig()
    img = torch.rand(3, 3, 32, 32, requires_grad=True)
    masks = torch.zeros(3, 2, 32, 32, dtype=torch.bool)
    masks[:2, 0, 4:10, 4:10] = masks[:2, 1, 20:26, 20:26] = True
    found = torch.tensor([[True, True], [True, False], [False, False]])
    pair = [Obj("circle", ("red", "circle"), (2, 3)), Obj("square", ("blue", "square"), (6, 7))]
    objs = [pair, pair, [Obj("cat", ("cat",), (2,))]]
    out = train.object_loss(cap, img, objs, masks, found, cfg.smoothing)
    assert out.shape == (3,) and (out > 0).all()
    out[0].backward()
    reach = torch.zeros(32, 32, dtype=torch.bool)
    reach[2:12, 2:12] = reach[18:28, 18:28] = True  # the masks grown by 2 px
    g = img.grad.abs().sum(1)  # (3, H, W)
    assert (g[0][~reach] == 0).all() and (g[0][reach] > 0).float().mean() > 0.9
    assert (g[1:] == 0).all()

    def score(pic, text):  # the captioner's loss of one picture read as one phrase
        return -caption_logprob(cap, pic[None], [text], smoothing=cfg.smoothing)[0]
    grown = torch.nn.functional.max_pool2d(masks[1, :1].float(), 5, 1, 2)  # (1, H, W)
    x = img.detach()
    expect = (score(x[1] * grown + 1 - grown, "a red circle")  # found: alone on white
              + score(x[1] * (1 - grown) + grown, "a blue square")) / 2  # not found: the rest
    torch.testing.assert_close(out[1], expect)
    torch.testing.assert_close(out[2], score(x[2], "a cat"))  # nothing found: the whole picture


def test_w_obj_alone_keeps_the_segmenter_and_stores_no_maps(world):
    """--w_obj with the attention terms off still segments and scores the objects; no attention
    map is stored for terms weighted 0."""
    cfg = train.parse(world["args"] + ["--w_tok", "0", "--w_pix", "0", "--w_obj", "1"])

    def everything(images, nouns):  # every object found, everywhere
        B, _, H, W = images.shape
        K = max(len(n) for n in nouns)
        return torch.ones(B, K, H, W, dtype=torch.bool), torch.ones(B, K, dtype=torch.bool)
    r = train.setup(cfg, sample.load("tiny"), [load_captioner(cfg.captioner)], everything, PROMPTS,
                    "cpu", torch.float32)
    out = train.losses(r, [0, 1], 0)
    assert out.maps == [] and (out.tok == 0).all() and (out.obj > 0).all()


def test_several_captioners_pay_their_mean_and_the_first_reads_the_objects(world, tmp_path):
    """--captioner A,B: concept matching is the mean of A's and B's losses on the same picture
    and crop; --w_obj's objects are read by A alone. From the command line too: a step trains."""
    torch.manual_seed(1)
    other = tiny_blip(str(tmp_path / "blip2"))  # same shape, other weights
    cfg = train.parse(world["args"] + ["--w_obj", "1"])
    a, b = load_captioner(cfg.captioner), load_captioner(other)

    def everything(images, nouns):
        B, _, H, W = images.shape
        K = max(len(n) for n in nouns)
        return torch.ones(B, K, H, W, dtype=torch.bool), torch.ones(B, K, dtype=torch.bool)
    out = {}
    for name, caps in (("a", [a]), ("b", [b]), ("ab", [a, b])):
        r = train.setup(cfg, sample.load("tiny"), caps, everything, PROMPTS, "cpu", torch.float32)
        out[name] = train.losses(r, [0, 1], 0)
    assert torch.equal(out["a"].img, out["ab"].img)  # the same draws
    assert (out["a"].cap - out["b"].cap).abs().min() > 1e-4  # two different readers
    torch.testing.assert_close(out["ab"].cap, (out["a"].cap + out["b"].cap) / 2)
    assert (out["a"].obj - out["b"].obj).abs().min() > 1e-4
    assert torch.equal(out["ab"].obj, out["a"].obj)  # the first captioner reads the objects
    run(world, tmp_path / "cli", "--steps", "1", "--captioner", f"{other},{cfg.captioner}")
    assert json.loads((tmp_path / "cli" / "log.jsonl").read_text())["cap"] > 0


def test_relation_masks_exchange_where_the_relation_is_drawn_reversed(world):
    """--relation_masks: a segmenter that finds every first object right of the second; the
    attention losses change for the "left of" prompt only (masks exchanged), not for the prompt
    without a relation nor for "above" (drawn side by side: no vertical order to reverse)."""
    def right_of(images, nouns):  # object 0 on the right half, object 1 on the left
        B, _, H, W = images.shape
        masks = torch.zeros(B, max(len(n) for n in nouns), H, W, dtype=torch.bool)
        masks[:, 0, :, W // 2:] = True
        masks[:, 1:, :, :W // 2] = True
        return masks, torch.ones(masks.shape[:2], dtype=torch.bool)
    out = {}
    for flag in ("--no-relation_masks", "--relation_masks"):
        cfg = train.parse(world["args"] + ["--batch", "4", flag])
        r = train.setup(cfg, sample.load("tiny"), [load_captioner(cfg.captioner)], right_of,
                        PROMPTS, "cpu", torch.float32)
        out[flag] = train.losses(r, [0, 1, 2, 3], 0)
    off, on = out["--no-relation_masks"], out["--relation_masks"]
    assert torch.equal(off.img, on.img)  # the same draws: only the masks differ
    assert (on.pix[1] - off.pix[1]).abs() > 1e-6
    assert torch.equal(on.pix[[0, 2, 3]], off.pix[[0, 2, 3]])
    assert torch.equal(on.tok[[0, 2, 3]], off.tok[[0, 2, 3]])


def test_w_rel_alone_stores_maps_and_scores_the_relation(world):
    """--w_rel with the attention terms off and no segmenter stores the maps and gives the
    prompts with a relation ("on the left of", "above") a term, and only them."""
    cfg = train.parse(world["args"] + ["--w_tok", "0", "--w_pix", "0", "--w_rel", "1",
                                       "--batch", "4"])
    r = train.setup(cfg, sample.load("tiny"), [load_captioner(cfg.captioner)], None, PROMPTS,
                    "cpu", torch.float32)
    out = train.losses(r, [0, 1, 2, 3], 0)
    assert out.maps and (out.tok == 0).all() and (out.rel[[0, 2]] == 0).all()
    assert (out.rel[[1, 3]] > 0).all()  # near-uniform attention: centres together, gap < 0.1
    out.rel.sum().backward()  # the term reaches the LoRA weights through the maps
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.params)
