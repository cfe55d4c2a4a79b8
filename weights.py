"""Loading official Stable Diffusion 1.5 / SDXL weights into our UNet and VAE, strictly.

Two layouts: a diffusers folder (unet/, vae/, text_encoder[_2]/, tokenizer[_2]/) whose tensor names
already are our parameter names, and an original single file (LDM / SGM: `model.diffusion_model.*`,
`first_stage_model.*`, the text encoders under `cond_stage_model.*` / `conditioner.embedders.*`)
renamed through one table per model (the same renames as diffusers' single-file conversion); its
CLIP tokenizers come from the BPE merges file that open-clip-torch ships, read offline.
Modules are built on the meta device and filled with `assign=True`: no random init of billions
of parameters. A hub id (org/name) that is not a local path is fetched or read from the local
hub cache (HF_HUB_OFFLINE=1: the cache only).
Usage: `pipe = load_pipeline("path/to/stable-diffusion-xl-base-1.0", "cuda", torch.float16)`.
"""
import gzip
import importlib.util
import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from unet import SD15, SDXL, TINY_SD15, TINY_SDXL, UNet, UNetConfig
from vae import SD15_VAE, SDXL_VAE, TINY_VAE, VAE, VAEConfig, rename_legacy_vae_keys

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."


def load_state(path: str) -> dict[str, torch.Tensor]:
    """One .safetensors file, or all shards listed by a `*.safetensors.index.json`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")
    if path.endswith(".safetensors.index.json"):
        with open(path) as f:
            shards = sorted({os.path.join(os.path.dirname(path), s)
                             for s in json.load(f)["weight_map"].values()})
        return {k: v for shard in shards for k, v in load_state(shard).items()}
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: expected a .safetensors file or a .safetensors.index.json")
    try:  # only to put the path in front of safetensors' own message
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def save_weights(sd: dict, path: str) -> None:
    """Write tensors as safetensors atomically: a temp file, then a rename (never half a file)."""
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_strict(module: nn.Module, sd: dict, what: str = "state dict") -> None:
    """`load_state_dict(sd, strict=True, assign=True)`, but any mismatch is ONE readable line."""
    want = {k: v.shape for k, v in module.state_dict().items()}
    bad = {"missing keys": [k for k in want if k not in sd],
           "unexpected": [k for k in sd if k not in want],
           "shape mismatches": [f"{k} {tuple(sd[k].shape)} vs {tuple(s)}"
                                for k, s in want.items() if k in sd and sd[k].shape != s]}
    if any(bad.values()):
        raise ValueError(f"{what}: " + ", ".join(f"{len(ks)} {name} (first: {', '.join(ks[:2])})"
                                                 for name, ks in bad.items() if ks))
    module.load_state_dict(sd, strict=True, assign=True)


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """Parse a diffusers unet/config.json (UNet2DConditionModel) into our UNetConfig."""
    n = len(d["block_out_channels"])
    attn = [t.startswith("CrossAttn") for t in d["down_block_types"]]
    assert [t.startswith("CrossAttn") for t in d["up_block_types"]] == attn[::-1], \
        "unsupported UNet: up blocks must mirror the down blocks"
    assert not d.get("reverse_transformer_layers_per_block"), "unsupported: asymmetric up depths"
    # one int means every level; SD configs leave num_attention_heads null and then
    # attention_head_dim is the head COUNT
    layers, heads = (tuple(x) if isinstance(x, (list, tuple)) else (x,) * n for x in (
        d.get("transformer_layers_per_block", 1),
        d.get("num_attention_heads") or d.get("attention_head_dim", 8)))
    text_time = d.get("addition_embed_type") == "text_time"
    return UNetConfig(
        channels=tuple(d["block_out_channels"]), heads=heads,
        depth=tuple(layers[i] if attn[i] else 0 for i in range(n)),
        mid_depth=layers[-1],  # diffusers' mid block takes the last level's depth
        n_res=d.get("layers_per_block", 2), groups=d.get("norm_num_groups", 32),
        ctx_dim=d["cross_attention_dim"], linear_proj=bool(d.get("use_linear_projection", False)),
        adm_dim=d["projection_class_embeddings_input_dim"] if text_time else 0,
        time_id_dim=d.get("addition_time_embed_dim") or 256, in_channels=d.get("in_channels", 4))


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    """Parse a diffusers vae/config.json (AutoencoderKL) into our VAEConfig."""
    return VAEConfig(
        channels=tuple(d["block_out_channels"]), n_res=d.get("layers_per_block", 2),
        groups=d.get("norm_num_groups", 32), latent=d.get("latent_channels", 4),
        scale=d.get("scaling_factor", 0.18215),  # SD1.5's file omits it: the library default
        # diffusers defaults force_upcast to True, but the SD1.5 pipeline ignores it; SDXL sets it
        upcast=bool(d.get("force_upcast", False)), in_channels=d.get("in_channels", 3))


# Leaf renames inside blocks, diffusers -> original (attention internals are the same in both)
UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RES = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _block(table: dict, d: str, o: str, leaves: dict | None = None) -> None:
    """Map block prefix d to o, plus d.leaf to o.renamed_leaf for the given leaves."""
    table[d] = o
    table.update({f"{d}.{a}": f"{o}.{b}" for a, b in (leaves or {}).items()})


def _rename(keys, table: dict[str, str]) -> dict[str, str]:
    """Each key -> its LONGEST prefix (whole dotted parts) in `table`, replaced, + the rest."""
    out = {}
    for key in keys:
        parts = key.split(".")
        heads = (".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1))
        head = next((h for h in heads if h in table), None)
        assert head is not None, f"no single-file name for {key}"
        out[key] = table[head] + key[len(head):]
    return out


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """diffusers UNet key -> original key (without `model.diffusion_model.`)."""
    t = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    L = cfg.n_res + 1  # original blocks per level: the resnets + one sampler slot
    for i in range(len(cfg.channels)):
        for j in range(cfg.n_res):  # input_blocks.0 is conv_in, hence the 1 +
            _block(t, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{1 + i * L + j}.0", UNET_RES)
            _block(t, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{1 + i * L + j}.1")
        _block(t, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * L}.0.op")
    for j, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        _block(t, f"mid_block.{name}", f"middle_block.{j}", UNET_RES if j != 1 else None)
    for i, depth in enumerate(reversed(cfg.depth)):
        for j in range(L):
            _block(t, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * L + j}.0", UNET_RES)
            _block(t, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{i * L + j}.1")
        # the level's last output block also holds the upsampler, after the attention if any
        up = f"output_blocks.{i * L + L - 1}.{2 if depth else 1}.conv"
        _block(t, f"up_blocks.{i}.upsamplers.0.conv", up)
    # inside transformer blocks nothing changes, so prefixes suffice; the keys are our model's
    with torch.device("meta"):
        return _rename(UNet(cfg).state_dict(), t)


def vae_key_map(cfg: VAEConfig) -> dict[str, str]:
    """diffusers VAE key -> original LDM key (without `first_stage_model.`)."""
    t = {k: k for k in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out",
                        "decoder.conv_in", "decoder.conv_out")}
    n = len(cfg.channels)
    for p in ("encoder", "decoder"):
        t[f"{p}.conv_norm_out"] = f"{p}.norm_out"
        _block(t, f"{p}.mid_block.resnets.0", f"{p}.mid.block_1", VAE_RES)
        _block(t, f"{p}.mid_block.resnets.1", f"{p}.mid.block_2", VAE_RES)
        _block(t, f"{p}.mid_block.attentions.0", f"{p}.mid.attn_1", VAE_ATTN)
    for i in range(n):
        d, o = f"encoder.down_blocks.{i}", f"encoder.down.{i}"
        for j in range(cfg.n_res):
            _block(t, f"{d}.resnets.{j}", f"{o}.block.{j}", VAE_RES)
        _block(t, f"{d}.downsamplers.0.conv", f"{o}.downsample.conv")
        # LDM lists decoder levels by resolution (up.0 = full size), diffusers in execution order
        d, o = f"decoder.up_blocks.{i}", f"decoder.up.{n - 1 - i}"
        for j in range(cfg.n_res + 1):
            _block(t, f"{d}.resnets.{j}", f"{o}.block.{j}", VAE_RES)
        _block(t, f"{d}.upsamplers.0.conv", f"{o}.upsample.conv")
    with torch.device("meta"):
        return _rename(VAE(cfg).state_dict(), t)


def _vae_attn_weight(key: str) -> bool:
    # LDM stores the VAE mid-attention projections as 1x1 convs [C,C,1,1], diffusers as Linears
    return ".attentions.0.to_" in key and key.endswith(".weight")


def single_file_kind(sd: dict) -> str:
    """'sdxl' or 'sd15' for an original single-file dict (SGM's label_emb = SDXL add-embedding)."""
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        raise ValueError(f"not an SD1.5/SDXL single-file checkpoint (no {UNET_PREFIX}* keys)")
    return "sdxl" if any(k.startswith(UNET_PREFIX + "label_emb.") for k in sd) else "sd15"


def _unprefix(sd: dict, prefix: str, kmap: dict[str, str]) -> dict:
    """sd's `prefix` part, renamed back through kmap; unknown names pass through for load_strict."""
    inv = {o: d for d, o in kmap.items()}
    return {inv.get(k[len(prefix):], k[len(prefix):]): v for k, v in sd.items()
            if k.startswith(prefix)}


def from_single_file(sd: dict, unet_cfg: UNetConfig, vae_cfg: VAEConfig) -> tuple[dict, dict]:
    """Original single-file dict -> (unet_sd, vae_sd) with diffusers names. Everything else
    (text encoders, `model_ema.*`, `betas`, ...) is dropped."""
    vae_sd = _unprefix(sd, VAE_PREFIX, vae_key_map(vae_cfg))
    vae_sd = {k: v[:, :, 0, 0] if _vae_attn_weight(k) and v.ndim == 4 else v  # [C,C,1,1] -> [C,C]
              for k, v in vae_sd.items()}
    return _unprefix(sd, UNET_PREFIX, unet_key_map(unet_cfg)), vae_sd


def to_single_file(unet_sd: dict, vae_sd: dict, unet_cfg: UNetConfig, vae_cfg: VAEConfig,
                   text: tuple = ()) -> dict:
    """The inverse of from_single_file (and of text_from_single_file, when `text` holds the text
    encoders' transformers-named dicts): diffusers-named dicts -> one original-layout dict."""
    umap, vmap = unet_key_map(unet_cfg), vae_key_map(vae_cfg)
    sd = {UNET_PREFIX + umap[k]: v for k, v in unet_sd.items()}
    for k, v in vae_sd.items():
        sd[VAE_PREFIX + vmap[k]] = v[:, :, None, None] if _vae_attn_weight(k) else v
    prefixes = TEXT_PREFIXES["sdxl" if unet_cfg.adm_dim else "sd15"]
    for prefix, enc in zip(prefixes, text):
        enc = clip_names(enc)
        if prefix == OPENCLIP_PREFIX:
            sd |= {prefix + k: v for k, v in openclip_to_single_file(enc).items()}
        else:
            sd |= {prefix + k: v for k, v in enc.items() if not k.endswith(".position_ids")}
    return sd


def clip_names(sd: dict) -> dict:
    """A CLIP text encoder's tensors under the names of the files (`text_model.*`, and the
    projection): transformers 5's CLIPTextModel drops the `text_model.` level from its own."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in sd.items()}


# --- text encoders in single files: CLIP ViT-L as transformers names it; SDXL's OpenCLIP bigG ---
OPENCLIP_PREFIX = "conditioner.embedders.1.model."
TEXT_PREFIXES = {"sd15": ["cond_stage_model.transformer."],
                 "sdxl": ["conditioner.embedders.0.transformer.", OPENCLIP_PREFIX]}
# per residual block, open_clip -> transformers; q, k and v are fused into open_clip's in_proj
OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2",
                  "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
                  "mlp.c_proj": "mlp.fc2"}


def openclip_key_map(n_layers: int) -> dict[str, str]:
    """CLIPTextModelWithProjection key -> OpenCLIP text key (without the prefix); q, k and v all
    map to the fused in_proj, in that order (its rows: q, then k, then v)."""
    t = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
         "text_model.embeddings.position_embedding.weight": "positional_embedding",
         "text_model.final_layer_norm.weight": "ln_final.weight",
         "text_model.final_layer_norm.bias": "ln_final.bias",
         "text_projection.weight": "text_projection"}
    for i in range(n_layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            t |= {f"{hf}{b}.{leaf}": f"{oc}{a}.{leaf}" for a, b in OPENCLIP_BLOCK.items()}
            t |= {f"{hf}self_attn.{q}_proj.{leaf}": f"{oc}attn.in_proj_{leaf}" for q in "qkv"}
    return t


HF_LAYER = r"text_model\.encoder\.layers\.(\d+)\."


def _n_layers(keys, pattern: str) -> int:
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def openclip_from_single_file(sd: dict) -> dict:
    """OpenCLIP text tower tensors (prefix removed) -> CLIPTextModelWithProjection names: q, k, v
    split out of in_proj; the projection transposed (open_clip computes x @ P, a Linear x @ W.T).
    Names it does not know pass through, so load_strict reports them."""
    kmap = openclip_key_map(_n_layers(sd, r"transformer\.resblocks\.(\d+)\."))
    out = {}
    for hf, oc in kmap.items():
        if oc in sd:
            v = sd[oc].T.contiguous() if oc == "text_projection" else sd[oc]
            q = hf.split("self_attn.")[-1][0]  # q, k or v: which third of in_proj
            out[hf] = v.chunk(3)["qkv".index(q)] if "in_proj" in oc else v
    known = set(kmap.values()) | {"logit_scale", "attn_mask"}  # the CLIP pair's temperature
    return out | {k: v for k, v in sd.items() if k not in known}


def openclip_to_single_file(enc: dict) -> dict:
    """The inverse of openclip_from_single_file (logit_scale is not written: nothing reads it)."""
    out = {}
    for hf, oc in openclip_key_map(_n_layers(enc, HF_LAYER)).items():
        out.setdefault(oc, []).append(enc[hf].T if oc == "text_projection" else enc[hf])
    return {k: torch.cat(v) if len(v) == 3 else v[0] for k, v in out.items()}


def text_from_single_file(sd: dict) -> list[dict]:
    """The text encoders of an original single-file dict, transformers-named, SDXL's CLIP-L then
    bigG; [] when it holds none."""
    out = []
    for prefix in TEXT_PREFIXES[single_file_kind(sd)]:
        enc = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if enc:
            out.append(openclip_from_single_file(enc) if prefix == OPENCLIP_PREFIX else
                       {k: v for k, v in enc.items() if not k.endswith(".position_ids")})
    return out


def text_config(sd: dict, act: str, tok) -> CLIPTextConfig:
    """A text encoder's config read off its tensors' shapes (a single file has no config). Every
    CLIP text tower has 64-wide heads; OpenAI's CLIP uses quick_gelu, OpenCLIP's bigG gelu."""
    emb = "text_model.embeddings."
    if emb + "token_embedding.weight" not in sd:
        raise ValueError(f"no {emb}token_embedding.weight: not a CLIP text encoder")
    vocab, width = sd[emb + "token_embedding.weight"].shape
    proj = sd.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_attention_heads=width // 64,
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_n_layers(sd, HF_LAYER),
        max_position_embeddings=sd[emb + "position_embedding.weight"].shape[0], hidden_act=act,
        projection_dim=width if proj is None else proj.shape[0], bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@dataclass
class Pipeline:
    unet: UNet
    vae: VAE          # frozen, eval; fp32 for SDXL when the rest is fp16
    tokenizers: list  # CLIPTokenizer per text encoder (SDXL: CLIP-L, then bigG)
    encoders: list    # CLIPTextModel (+ CLIPTextModelWithProjection for SDXL); frozen, eval
    sdxl: bool
    size: int = 512   # the image side it was trained at: the UNet's sample_size x the VAE factor


def _folder_part(folder: str, parse) -> tuple:
    """(parsed config, state dict) of a diffusers model subfolder such as unet/. Weights: full
    precision, else the fp16 variant, else the sharded index (full, then fp16)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}/config.json: missing (not a diffusers model folder?)")
    names = [f"diffusion_pytorch_model{v}.safetensors{i}" for i in ("", ".index.json")
             for v in ("", ".fp16")]
    path = next((p for p in (os.path.join(folder, n) for n in names) if os.path.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model*.safetensors*")
    with open(os.path.join(folder, "config.json")) as f:
        return parse(json.load(f)), load_state(path)


def _build(cls, cfg, sd: dict, what: str, device, dtype) -> nn.Module:
    with torch.device("meta"):  # no memory, no random init: load_strict assigns the tensors
        module = cls(cfg)
    load_strict(module, sd, what)
    return module.to(device, dtype)


def bpe_file() -> str:
    """CLIP's BPE merges as open-clip-torch ships them, found without importing open_clip (which
    would import torchvision): a single file carries no tokenizer, and this needs no download."""
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz") \
        if spec and spec.submodule_search_locations else ""
    if not os.path.isfile(path):
        raise FileNotFoundError("a single-file checkpoint's CLIP tokenizer is built from the BPE "
                                "file of open-clip-torch: pip install --no-deps open-clip-torch")
    return path


def _byte_chars() -> list[str]:
    """CLIP's (GPT-2's) byte -> character map, in CLIP's vocabulary order: "!" is id 0."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]  # the printable bytes
    return [chr(c) for c in bs + [256 + n for n in range(256 - len(bs))]]  # the rest past 255


def bpe_tokenizer(path: str, pad="<|endoftext|>", max_len=77) -> CLIPTokenizer:
    """CLIP's tokenizer from a BPE merges file in CLIP's format (.txt or .txt.gz: a version line,
    then one merge "a b" a line by rank), as CLIP's SimpleTokenizer builds it: the 256 byte
    characters, the same with </w>, one token per merge (the first 48894), the two specials."""
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else
              open(path, encoding="utf-8")) as f:
            lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable BPE merges file ({e})") from None
    merges = [tuple(ln.split()) for ln in lines if ln]
    if not merges or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not a BPE merges file (lines of two symbols)")
    chars = _byte_chars()
    names = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab = {w: i for i, w in enumerate(names + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=max_len)


def _text_encoder(sd: dict, cls, act: str, tok, what: str) -> nn.Module:
    with torch.device("meta"):  # as _build: load_strict assigns the tensors
        enc = cls(text_config(sd, act, tok))
    if not any(k.startswith("text_model.") for k in enc.state_dict()):  # see clip_names
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    load_strict(enc, sd, what)
    # the one buffer not in the file (non-persistent): the positions 0..76, made as CLIP makes it
    n = enc.config.max_position_embeddings
    getattr(enc, "text_model", enc).embeddings.register_buffer(
        "position_ids", torch.arange(n)[None], persistent=False)
    return enc


def load_pipeline(model: str, device="cpu", dtype=torch.float32, text_from: str | None = None,
                  bpe: str | None = None) -> Pipeline:
    """A diffusers folder, or an original single .safetensors file with its text encoders (or
    those of `text_from`, a diffusers folder) and CLIP tokenizers built from the BPE merges file
    `bpe` (default: open-clip-torch's). Local files only, never a download."""
    if not os.path.exists(model):
        raise FileNotFoundError(f"{model}: no such model folder or file")
    texts = []
    if os.path.isdir(model):
        ucfg, unet_sd = _folder_part(os.path.join(model, "unet"), unet_config_from_diffusers)
        vcfg, vae_sd = _folder_part(os.path.join(model, "vae"), vae_config_from_diffusers)
        vae_sd, text_from = rename_legacy_vae_keys(vae_sd), model  # e.g. SD1.5's query/key/value
        with open(os.path.join(model, "unet", "config.json")) as f:
            size = (json.load(f).get("sample_size") or 0) * vcfg.factor  # may be null
    else:  # a single file has no config: the presets; check the rest before reading gigabytes
        if text_from is not None and not os.path.isdir(text_from):
            raise FileNotFoundError(f"{text_from}: no such folder (text_from: a diffusers folder "
                                    f"with the text encoders and tokenizers)")
        bpe = bpe or (bpe_file() if text_from is None else None)
        sd = load_state(model)
        ucfg, vcfg = (SDXL, SDXL_VAE) if single_file_kind(sd) == "sdxl" else (SD15, SD15_VAE)
        size = 0
        unet_sd, vae_sd = from_single_file(sd, ucfg, vcfg)
        texts = [] if text_from else text_from_single_file(sd)
        if not (text_from or len(texts) == 1 + (ucfg.adm_dim > 0)):
            raise ValueError(f"{model}: holds no text encoders; give text_from=<a diffusers "
                             f"folder> with them and the tokenizers")
    unet = _build(UNet, ucfg, unet_sd, f"{model}: unet", device, dtype)
    # the SDXL VAE overflows fp16 (its config sets force_upcast): keep it fp32, decode in fp32
    vae_dtype = torch.float32 if dtype == torch.float16 and vcfg.upcast else dtype
    vae = _build(VAE, vcfg, vae_sd, f"{model}: vae", device, vae_dtype).requires_grad_(False).eval()
    tokenizers, encoders = [], []
    for i, (sub, cls) in enumerate((("", CLIPTextModel), ("_2", CLIPTextModelWithProjection))):
        if texts:  # a single file's: SDXL's second tokenizer pads with "!", as its folder's does
            if i == len(texts):
                break
            tok = bpe_tokenizer(bpe, pad="!" if i else "<|endoftext|>")
            act = "gelu" if i else "quick_gelu"  # OpenCLIP's bigG; OpenAI's CLIP ViT-L
            enc = _text_encoder(texts[i], cls, act, tok, f"{model}: text encoder {i + 1}")
        else:
            enc_dir, tok_dir = (os.path.join(text_from, n + sub)
                                for n in ("text_encoder", "tokenizer"))
            if sub and not os.path.isdir(enc_dir):
                break  # SD1.5 has one text encoder
            try:  # e.g. a half-downloaded model.safetensors: one line naming the folder
                enc = cls.from_pretrained(enc_dir, local_files_only=True)
                tok = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
            except (OSError, ValueError, SafetensorError) as e:
                raise ValueError(f"{enc_dir}: not a readable text encoder with its tokenizer "
                                 f"({str(e).splitlines()[0][:200]})") from None
        encoders.append(enc.to(device, dtype).requires_grad_(False).eval())
        tokenizers.append(tok)
    sdxl = ucfg.adm_dim > 0
    return Pipeline(unet, vae, tokenizers, encoders, sdxl, size or (1024 if sdxl else 512))


# --- random-weight presets: tiny pipelines for tests and laptops, and the model paths ---


def clip_tokenizer(words=(), pad="<|endoftext|>", max_len=77):
    """A CLIP BPE tokenizer built offline: byte-level characters plus merges that make each of
    `words` a single token. Stands in for the real vocabulary in tests and tiny models."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = []
    while True:  # BPE applies merges by rank across words, so merges are added until each is whole
        full = {**vocab, "<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
        tok = CLIPTokenizer(vocab=full, merges=merges, pad_token=pad, model_max_length=max_len)
        split = [pieces for pieces in map(tok.tokenize, words) if len(pieces) > 1]
        if not split:
            return tok
        for a, b, *_ in split:  # join a word's first two pieces; a merge of lowest rank only ever
            if (a, b) not in merges:  # joins, so whole words stay whole and the loop ends
                merges.append((a, b))
                vocab[a + b] = len(vocab)


def tiny_pipeline(sdxl=False, seed=0):
    """Random-weight tiny SD1.5-like or SDXL-like pipeline: its pictures are noise; it exists so
    everything runs on a laptop without downloaded weights."""
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, projection_dim=32)
    encoders = [CLIPTextModel(text)]
    tokenizers = [tok]
    if sdxl:
        encoders.append(CLIPTextModelWithProjection(text))
        tokenizers.append(clip_tokenizer(pad="!"))
    for e in encoders:
        e.requires_grad_(False).eval()
    unet = UNet(TINY_SDXL if sdxl else TINY_SD15)
    return Pipeline(unet, VAE(TINY_VAE), tokenizers, encoders, sdxl, size=64)


ROOT = os.path.dirname(os.path.abspath(__file__))


# what the project reads from a hub repository (nothing else is downloaded): a diffusers pipeline's
# configs, full-precision safetensors (or their shards), tokenizers and a comat.json preset; a
# transformers model's configs, vocabularies and safetensors
PIPELINE_FILES = ["model_index.json", "comat.json", "*/config.json", "tokenizer*/*",
                  "unet/diffusion_pytorch_model.safetensors*", "unet/diffusion_pytorch_model-*",
                  "vae/diffusion_pytorch_model.safetensors*", "text_encoder*/model.safetensors*",
                  "text_encoder*/model-*.safetensors"]  # X.safetensors* = X and its shard index
MODEL_FILES = ["*.json", "*.txt", "*.model", "model.safetensors", "model.safetensors.index.json",
               "model-*.safetensors"]
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def find(path: str, files=PIPELINE_FILES) -> str:
    """A model path as given; relative and not there, relative to this repository (the shipped
    toy folders work from any directory); an org/name that is neither, a hub repository: its
    `files` downloaded or, offline (HF_HUB_OFFLINE=1), read from the local hub cache."""
    inside = os.path.join(ROOT, path)
    if os.path.exists(path) or not path:
        return path
    if os.path.exists(inside):
        return inside
    if not HUB_ID.fullmatch(path):
        return path  # the caller says "no such file or folder"
    from huggingface_hub import constants, snapshot_download  # only for hub ids
    try:
        return snapshot_download(path, allow_patterns=files)
    except (OSError, ValueError) as e:  # no network, no such repository, incomplete cache, ...
        where = "in the local hub cache (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else \
            f"on the hub ({str(e).splitlines()[0][:150]})"
        raise FileNotFoundError(f"{path}: no such local path, and not found as a hub id {where}"
                                ) from None


def model_folder(path: str, want: tuple, what: str) -> str:
    """A transformers model folder (or hub id) for `what`, whose config.json names one of the
    architectures `want`: another model's folder is refused in one line, before loading it."""
    path = find(path, MODEL_FILES)
    config = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder ({what} is a model folder)")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{config}: missing (not a transformers model folder, for {what})")
    try:
        with open(config, encoding="utf-8") as f:
            arch = json.load(f).get("architectures") or []
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config}: not a readable JSON file ({e})") from None
    if arch and not set(arch) & set(want):
        raise ValueError(f"{path}: a {arch[0]} checkpoint; {what} needs {' or '.join(want)}")
    return path


def kind(model: str) -> str:
    """"sdxl" or "sd15", read from a preset name, a folder's unet/config.json or a single file's
    tensor names, without loading a weight."""
    if model in ("sd15", "sdxl", "tiny", "tiny-sdxl"):
        return "sdxl" if model.endswith("sdxl") else "sd15"
    model = find(model)
    if os.path.isdir(model):
        config = os.path.join(model, "unet", "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{config}: missing (not a diffusers model folder?)")
        with open(config) as f:
            return "sdxl" if json.load(f).get("addition_embed_type") == "text_time" else "sd15"
    if not os.path.isfile(model):
        raise FileNotFoundError(f"{model}: no such model folder or file")
    with safe_open(model, "pt") as f:  # the header only
        return single_file_kind(dict.fromkeys(f.keys()))


def comat_json(model: str) -> tuple[str, dict]:
    """A model folder's comat.json, where it would be and what it holds ({} when there is none)."""
    path = os.path.join(find(model), "comat.json")
    if not os.path.isfile(path):
        return path, {}
    with open(path, encoding="utf-8") as f:
        return path, json.load(f)


def folder_preset(model: str) -> dict:
    """A model folder's own training preset, comat.json (the toy model carries one: its captioner,
    segmenter and run sizes); paths in it are relative to the folder. {} when there is none."""
    path, raw = comat_json(model)  # _: comments; vocabulary: see unknown_words
    preset = {k: v for k, v in raw.items() if not k.startswith("_") and k != "vocabulary"}
    for k in ("captioner", "dino", "sam"):  # captioner: one folder or a comma-separated list
        if preset.get(k):
            preset[k] = ",".join(os.path.relpath(os.path.join(os.path.dirname(path), p))
                                 for p in preset[k].split(","))
    return preset


def unknown_words(model: str, prompts) -> str | None:
    """One warning line when prompts use words outside the vocabulary that a model folder's
    comat.json lists (the toy model's: it can draw nothing else), naming them and what the model
    draws; None when every word is known or the folder lists none (real models read any text)."""
    vocab = comat_json(model)[1].get("vocabulary")
    if not vocab:
        return None
    known = set(vocab["words"])
    new = dict.fromkeys(w for p in prompts for w in re.findall(r"[\w'-]+", p.lower())
                        if w not in known)
    if not new:
        return None
    return (f"warning: {model} does not know {', '.join(list(new)[:8])}"
            f"{' ...' if len(new) > 8 else ''}: it draws {vocab['draws']} (nothing else)")


def load(model, device="cpu", dtype=torch.float32, text_from=None):
    """A preset name ("tiny", "tiny-sdxl": random weights), a path (diffusers folder or single
    file) or a hub id (org/name, see find)."""
    if model not in ("tiny", "tiny-sdxl"):
        return load_pipeline(find(model), device, dtype, text_from and find(text_from))
    pipe = tiny_pipeline(sdxl=model == "tiny-sdxl")
    for m in (pipe.unet, pipe.vae, *pipe.encoders):
        m.to(device, dtype)
    return pipe
