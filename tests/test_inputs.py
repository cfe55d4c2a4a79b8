"""What real users hand the CLIs: hub ids read from a hand-built hub cache (offline, nothing is
downloaded), and bad input, one case at a time, each ending in one line (or a warning and a skip)
with nothing half-written left behind."""
import argparse
import os
import shutil
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from oracle import tiny_grounded_sam
from PIL import Image
from safetensors.torch import save_file
from test_evaluate import tiny_vqa

import captioner
import evaluate as ev
import sample
import weights
from unet import TINY_SD15, TINY_SDXL, UNet, add_lora, lora_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "toy", "model")


def hub_repo(cache, repo, source, commit="c0ffee" * 6 + "0000"):
    """Copy folder `source` into a hub-cache layout: models--org--name/{refs/main, snapshots/}."""
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return str(base / "snapshots" / commit)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path/hub, offline. huggingface_hub reads the environment when
    imported, so its constants are set too."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# --- hub ids ---


def test_sample_cli_reads_a_hub_id_from_the_cache(tmp_path):
    cache = tmp_path / "hub"
    hub_repo(cache, "someone/toy-model", TOY)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "x.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "a red circle", "--model",
                        "someone/toy-model", "--steps", "2", "--out", str(out)], env=env,
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert Image.open(out).size == (64, 64)


def test_sample_cli_names_a_hub_id_it_cannot_find(offline):
    with pytest.raises(SystemExit) as e:  # sys.exit(message): printed, exit code 1
        sample.main(["x", "--model", "someone/missing"])
    assert one_line(e) == ("error: someone/missing: no such local path, and not found as a hub "
                           "id in the local hub cache (HF_HUB_OFFLINE=1)")


def test_every_model_flag_takes_a_hub_id(offline, tmp_path):
    snap = hub_repo(offline, "org/toy", TOY)
    assert weights.find("org/toy") == snap and weights.kind("org/toy") == "sd15"
    assert weights.folder_preset("org/toy")["segmenter"] == "shapes"
    assert weights.load("org/toy", text_from="org/toy").size == 64  # --model, --text-from
    hub_repo(offline, "org/blip", os.path.join(TOY, "captioner"))
    assert captioner.load_captioner("org/blip").model.config.architectures == [
        "BlipForConditionalGeneration"]  # --captioner
    gd, sam = tiny_grounded_sam(str(tmp_path / "gs"))
    hub_repo(offline, "org/gd", gd)
    hub_repo(offline, "org/sam", sam)
    assert len(weights.model_folder("org/gd", ("GroundingDinoForObjectDetection",), "--dino")) \
        and weights.model_folder("org/sam", ("SamModel",), "--sam").endswith("0000")
    hub_repo(offline, "org/vqa", os.path.join(TOY, "vqa"))  # --blip, as --clip and --dpt
    assert ev.load_scorers(ns(blip="org/vqa"), ["color"]).vqa is not None
    with pytest.raises(FileNotFoundError) as e:
        weights.find("org/absent")
    assert one_line(e).startswith("org/absent: no such local path, and not found as a hub id")


def test_a_local_path_wins_over_a_hub_id(offline, tmp_path, monkeypatch):
    (tmp_path / "org" / "toy").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert weights.find("org/toy") == "org/toy"  # the folder here, not the (empty) cache


# --- prompt files ---


@pytest.mark.parametrize("name, data, msg", [
    ("p.txt", "a red cat\n".encode("utf-16"), "prompts file is not UTF-8 text: {} (byte 0: "),
    ("p.txt", b"\n   \n\n", "prompts file has no prompts: {}"),
    ("p.jsonl", b'{"prompt": 3}\n', '{} line 1: needs {{"prompt": "some text"}}, got {{"pro'),
    ("p.jsonl", b'{"prompt": "a"}\n["a"]\n', '{} line 2: needs {{"prompt": "some text"}}, got'),
    ("p.jsonl", b'{"text": "a"}\n', '{} line 1: needs {{"prompt": "some text"}}'),
    ("p.jsonl", b'\n{"prompt": "a cat",\n', "{} line 2: not JSON (Expecting"),
])
def test_bad_prompt_files(tmp_path, name, data, msg):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompts", str(path), "--model", "tiny"])
    assert one_line(e).startswith("error: " + msg.format(path))


def test_unwritable_out_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    for main in (lambda o: sample.main(["x", "--model", "tiny", "--out", o]),
                 lambda o: ev.main([o, "--categories", "color", "--model", "tiny",
                                    "--data", str(tmp_path), "--blip", "x"])):
        with pytest.raises(SystemExit) as e:
            main(str(tmp_path / "file" / "sub" / "x.png"))
        assert one_line(e).startswith(f"error: cannot write {tmp_path}/file/sub/")
        assert "is a file" in str(e.value) or "Not a directory" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["file"]


# --- evaluate.py: samples folders, prompt files, scorers ---


@pytest.fixture
def scored(tmp_path):
    """A color samples folder of two good images, and the flags that score it."""
    folder = tmp_path / "out" / "color" / "samples"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32), "red").save(folder / f"a red cat_{i:06d}.png")
    return folder, [str(tmp_path / "out"), "--categories", "color", "--blip",
                    tiny_vqa(str(tmp_path / "vqa")), "--blip-size", "32", "--parser", "rules"]


def test_stray_file_in_samples_is_skipped_with_a_warning(scored, capsys):
    folder, flags = scored
    (folder / ".DS_Store").write_bytes(b"\0\1binary")
    with pytest.warns(UserWarning, match=r"\.DS_Store: not a \.png sample, skipped"):
        ev.main(flags)
    assert "color: blip" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_unreadable_sample_is_named(scored, damage):
    folder, flags = scored
    path = folder / "a red cat_000001.png"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"hello")
    with pytest.raises(SystemExit) as e:
        ev.main(flags)
    assert one_line(e).startswith(f"error: {path}: not a readable image (")


def test_empty_samples_folder(scored):
    folder, flags = scored
    for f in os.listdir(folder):
        os.remove(folder / f)
    with pytest.raises(SystemExit) as e:
        ev.main(flags)
    assert one_line(e) == f"error: {folder}: no {{prompt}}_{{NNNNNN}}.png images"


@pytest.mark.parametrize("text", ["", "\r\n  \r\n"])
def test_empty_benchmark_prompt_file_leaves_no_folders(tmp_path, text):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "color_val.txt").write_text(text)
    with pytest.raises(SystemExit) as e:
        ev.main([str(tmp_path / "out"), "--categories", "color", "--model", "tiny", "--data",
                 str(tmp_path / "data"), "--blip", "x"])
    assert one_line(e) == (f"error: {tmp_path}/data/color_val.txt: no prompts (empty, or blank "
                           f"lines only)")
    assert not os.path.exists(tmp_path / "out")
    (tmp_path / "data" / "color_val.txt").write_bytes("a red cat\n".encode("utf-16"))
    with pytest.raises(SystemExit) as e:
        ev.main([str(tmp_path / "out"), "--categories", "color", "--model", "tiny", "--data",
                 str(tmp_path / "data"), "--blip", "x"])
    assert one_line(e) == f"error: {tmp_path}/data/color_val.txt: not UTF-8 text (byte 0)"


def test_blip_refuses_a_captioning_checkpoint(scored):
    _, flags = scored
    with pytest.raises(SystemExit) as e:
        ev.main(flags + ["--blip", os.path.join(TOY, "captioner")])
    assert one_line(e) == (f"error: {TOY}/captioner: a BlipForConditionalGeneration checkpoint; "
                           f"--blip needs BlipForQuestionAnswering")


def test_spacy_model_by_name(scored):
    _, flags = scored
    with pytest.raises(SystemExit) as e:
        ev.main(flags[:-2] + ["--spacy-model", "xx_no_such_model"])
    assert one_line(e) == ("error: spaCy's model xx_no_such_model is not installed (or spacy is "
                           "not): install it, or name another with --spacy-model NAME")


# --- the wrong folder for a flag, half-downloaded files, a LoRA for another model ---


def test_wrong_folder_for_each_model_flag(tmp_path):
    vqa, cap = os.path.join(TOY, "vqa"), os.path.join(TOY, "captioner")
    gd, sam = tiny_grounded_sam(str(tmp_path))
    cases = [(lambda: captioner.load_captioner(vqa),
              f"{vqa}: a BlipForQuestionAnswering checkpoint; --captioner (BLIP captioning) needs "
              "BlipForConditionalGeneration"),
             (lambda: ev.load_scorers(ns(clip=cap), ["non_spatial"]),
              f"{cap}: a BlipForConditionalGeneration checkpoint; --clip needs CLIPModel"),
             (lambda: ev.load_scorers(ns(dino=sam), ["spatial"]),
              f"{sam}: a SamModel checkpoint; --dino needs GroundingDinoForObjectDetection"),
             (lambda: weights.model_folder(gd, ("SamModel",), "--sam"),
              f"{gd}: a GroundingDinoForObjectDetection checkpoint; --sam needs SamModel"),
             (lambda: weights.load(cap),
              f"{cap}/unet/config.json: missing (not a diffusers model folder?)")]
    for fn, msg in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            fn()
        assert one_line(e).startswith(msg)


def ns(**flags):
    """evaluate.py's parsed flags for load_scorers."""
    base = dict(blip=None, clip=None, dino=None, dpt=None, device="cpu", blip_size=32,
                box_threshold=0.3, text_threshold=0.2)
    return argparse.Namespace(**base | flags)


def test_half_downloaded_files(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TOY, model)

    def cut(path):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    cut(model / "text_encoder" / "model.safetensors")
    with pytest.raises(ValueError) as e:
        weights.load(str(model))
    assert one_line(e).startswith(f"{model}/text_encoder: not a readable text encoder")
    cut(model / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(SystemExit) as e:
        sample.main(["x", "--model", str(model)])
    assert one_line(e).startswith(f"error: {model}/unet/diffusion_pytorch_model.fp16.safetensors: "
                                  f"not a readable safetensors file")
    cut(model / "captioner" / "model.safetensors")
    with pytest.raises(ValueError) as e:
        captioner.load_captioner(str(model / "captioner"))
    assert one_line(e).startswith(f"{model}/captioner: not a readable BLIP captioner (")


def test_an_sdxl_lora_on_sd15_is_refused_before_any_change(tmp_path):
    torch.manual_seed(0)
    xl = UNet(TINY_SDXL)
    add_lora(xl, 4)
    save_file(lora_state_dict(xl), tmp_path / "xl_lora.safetensors")
    pipe = weights.load("tiny")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(SystemExit) as e:
        sample.load_or_exit("tiny", lora=str(tmp_path / "xl_lora.safetensors"))
    assert one_line(e).startswith("error: LoRA does not fit this UNet (one for another model, "
                                  "e.g. SDXL's on SD1.5?): ")
    from unet import merge_lora
    with pytest.raises(ValueError):
        merge_lora(pipe.unet, weights.load_state(str(tmp_path / "xl_lora.safetensors")))
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert TINY_SD15.ctx_dim != TINY_SDXL.ctx_dim


# --- the toy model says what it cannot draw ---

DRAWS = ("it draws shapes circle, square, triangle; colours red, green, blue, yellow, purple, "
         "cyan; relations to the left of, to the right of, above, below, and (nothing else)")


def warnings(capsys):
    """stderr's warning lines (transformers draws its loading bars there too)."""
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]


def test_toy_model_names_words_it_does_not_know(tmp_path, capsys):
    sample.main(["a red cat", "a blue square", "--steps", "1", "--out", str(tmp_path / "x.png")])
    assert warnings(capsys) == [f"warning: toy/model does not know cat: {DRAWS}"]
    sample.main(["a red circle to the left of a blue square", "--steps", "1", "--out",
                 str(tmp_path / "y.png")])
    assert warnings(capsys) == []
    assert weights.unknown_words("tiny", ["a red cat"]) is None  # a real tokenizer: no list
    assert weights.unknown_words(TOY, ["A Dog, a CAT; a dog"]).startswith(
        f"warning: {TOY} does not know dog, cat: it draws shapes")


def test_toy_warning_in_train_and_evaluate(tmp_path, capsys):
    import train
    (tmp_path / "p.txt").write_text("a red cat\n")
    for empty in ("", " , "):  # nothing, or only commas
        with pytest.raises(SystemExit, match="--captioner BLIP_FOLDER is required"):
            train.main(["--prompts", str(tmp_path / "p.txt"), "--captioner", empty, "--out",
                        str(tmp_path / "run")])
        assert warnings(capsys) == [f"warning: toy/model does not know cat: {DRAWS}"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "color_val.txt").write_text("a purple dog\n")
    ev.main([str(tmp_path / "out"), "--categories", "color", "--model", "toy/model", "--data",
             str(tmp_path / "data"), "--n", "1", "--steps", "1", "--blip",
             tiny_vqa(str(tmp_path / "vqa")), "--blip-size", "32", "--parser", "rules"])
    assert warnings(capsys) == [f"warning: toy/model does not know dog: {DRAWS}"]
