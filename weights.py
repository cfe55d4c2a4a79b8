"""Loading official Stable Diffusion 1.5 / SDXL weights into our UNet and VAE, strictly.

Two layouts: a diffusers folder (unet/, vae/, text_encoder[_2]/, tokenizer[_2]/) whose tensor names
already are our parameter names, and an original single file (LDM / SGM: `model.diffusion_model.*`,
`first_stage_model.*`) renamed through one table per model (the same renames as diffusers'
single-file conversion). Modules are built on the meta device and filled with `assign=True`: no
random init of billions of parameters.
Usage: `pipe = load_pipeline("path/to/stable-diffusion-xl-base-1.0", "cuda", torch.float16)`.
"""
import json
import os
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


def to_single_file(unet_sd: dict, vae_sd: dict, unet_cfg: UNetConfig, vae_cfg: VAEConfig) -> dict:
    """The inverse of from_single_file: diffusers-named dicts -> one original-layout dict."""
    umap, vmap = unet_key_map(unet_cfg), vae_key_map(vae_cfg)
    sd = {UNET_PREFIX + umap[k]: v for k, v in unet_sd.items()}
    for k, v in vae_sd.items():
        sd[VAE_PREFIX + vmap[k]] = v[:, :, None, None] if _vae_attn_weight(k) else v
    return sd


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


def load_pipeline(model: str, device="cpu", dtype=torch.float32, text_from: str | None = None
                  ) -> Pipeline:
    """A diffusers folder, or an original single .safetensors file plus `text_from` (a diffusers
    folder with the text encoders and tokenizers). Local files only, never a download."""
    if not os.path.exists(model):
        raise FileNotFoundError(f"{model}: no such model folder or file")
    if os.path.isdir(model):
        ucfg, unet_sd = _folder_part(os.path.join(model, "unet"), unet_config_from_diffusers)
        vcfg, vae_sd = _folder_part(os.path.join(model, "vae"), vae_config_from_diffusers)
        vae_sd, text_from = rename_legacy_vae_keys(vae_sd), model  # e.g. SD1.5's query/key/value
        with open(os.path.join(model, "unet", "config.json")) as f:
            size = (json.load(f).get("sample_size") or 0) * vcfg.factor  # may be null
    else:  # a single file has no config: the presets; check text_from before reading gigabytes
        if text_from is None or not os.path.isdir(text_from):
            raise ValueError(f"{model}: a single-file checkpoint needs text_from=<a diffusers "
                             f"folder> for the text encoders and tokenizers (got {text_from})")
        sd = load_state(model)
        ucfg, vcfg = (SDXL, SDXL_VAE) if single_file_kind(sd) == "sdxl" else (SD15, SD15_VAE)
        size = 0
        unet_sd, vae_sd = from_single_file(sd, ucfg, vcfg)
    unet = _build(UNet, ucfg, unet_sd, f"{model}: unet", device, dtype)
    # the SDXL VAE overflows fp16 (its config sets force_upcast): keep it fp32, decode in fp32
    vae_dtype = torch.float32 if dtype == torch.float16 and vcfg.upcast else dtype
    vae = _build(VAE, vcfg, vae_sd, f"{model}: vae", device, vae_dtype).requires_grad_(False).eval()
    tokenizers, encoders = [], []
    for sub, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        enc_dir, tok_dir = (os.path.join(text_from, n + sub) for n in ("text_encoder", "tokenizer"))
        if sub and not os.path.isdir(enc_dir):
            break  # SD1.5 has one text encoder
        enc = cls.from_pretrained(enc_dir, local_files_only=True)
        encoders.append(enc.to(device, dtype).requires_grad_(False).eval())
        tokenizers.append(CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True))
    sdxl = ucfg.adm_dim > 0
    return Pipeline(unet, vae, tokenizers, encoders, sdxl, size or (1024 if sdxl else 512))


# --- random-weight presets: tiny pipelines for tests and laptops, and the model paths ---


def clip_tokenizer(words=(), pad="<|endoftext|>", max_len=77):
    """A CLIP BPE tokenizer built offline: byte-level characters plus merges that make each of
    `words` a single token. Stands in for the real vocabulary in tests and tiny models."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's printable byte map
    cs = bs + [256 + n for n in range(256 - len(bs))]  # then the rest, shifted past 255
    chars = [chr(c) for c in cs]  # CLIP's vocabulary order: "!" is id 0
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


def find(path: str) -> str:
    """A model path as given or, when it is relative and not there, relative to this repository,
    so the shipped toy folders (toy/model, toy/captioner) work from any directory."""
    inside = os.path.join(ROOT, path)
    return inside if not os.path.exists(path) and os.path.exists(inside) else path


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


def folder_preset(model: str) -> dict:
    """A model folder's own training preset, comat.json (the toy model carries one: its captioner,
    segmenter and run sizes); paths in it are relative to the folder. {} when there is none."""
    path = os.path.join(find(model), "comat.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        preset = {k: v for k, v in json.load(f).items() if not k.startswith("_")}  # _: comments
    for k in ("captioner", "dino", "sam"):
        if preset.get(k):
            preset[k] = os.path.relpath(os.path.join(os.path.dirname(path), preset[k]))
    return preset


def load(model, device="cpu", dtype=torch.float32, text_from=None):
    """A preset name ("tiny", "tiny-sdxl": random weights) or a path (diffusers folder or single
    file)."""
    if model not in ("tiny", "tiny-sdxl"):
        return load_pipeline(find(model), device, dtype, text_from)
    pipe = tiny_pipeline(sdxl=model == "tiny-sdxl")
    for m in (pipe.unet, pipe.vae, *pipe.encoders):
        m.to(device, dtype)
    return pipe
