"""Test oracles: the diffusers / transformers reference models built from our configs."""
from unet import UNetConfig


def diffusers_unet(cfg: UNetConfig):
    """The diffusers UNet2DConditionModel equivalent to `cfg` (random init, current device)."""
    from diffusers import UNet2DConditionModel
    # diffusers takes the mid depth from the last level's entry; levels without attention ignore
    # theirs, so only a last level WITH attention must agree with mid_depth.
    assert cfg.depth[-1] in (0, cfg.mid_depth), "diffusers ties mid depth to the last level"
    layers = tuple(d or 1 for d in cfg.depth[:-1]) + (cfg.mid_depth,)
    return UNet2DConditionModel(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in cfg.depth[::-1]),
        block_out_channels=cfg.channels,
        layers_per_block=cfg.n_res,
        transformer_layers_per_block=layers,
        attention_head_dim=cfg.heads,  # diffusers' name for the head count
        norm_num_groups=cfg.groups,
        cross_attention_dim=cfg.ctx_dim,
        use_linear_projection=cfg.linear_proj,
        addition_embed_type="text_time" if cfg.adm_dim else None,
        addition_time_embed_dim=cfg.time_id_dim if cfg.adm_dim else None,
        projection_class_embeddings_input_dim=cfg.adm_dim or None,
    )


def char_tokenizer(folder: str, pad: str = "<|endoftext|>"):
    """weights.clip_tokenizer (char-level, 514 ids) saved to `folder` as a tokenizer/ subfolder."""
    from weights import clip_tokenizer
    tok = clip_tokenizer(pad=pad)
    tok.save_pretrained(folder)
    return tok


def diffusers_vae(cfg):
    """The diffusers AutoencoderKL equivalent to vae.VAEConfig `cfg` (random init)."""
    from diffusers import AutoencoderKL
    n = len(cfg.channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.n_res,  # diffusers' decoder adds one per level, as ours does
        latent_channels=cfg.latent,
        norm_num_groups=cfg.groups,
        scaling_factor=cfg.scale,
        force_upcast=cfg.upcast,
    )


def tiny_blip(folder: str, words=(), image_size: int = 32):
    """A tiny random BLIP captioner + BERT word tokenizer saved to `folder` (no downloads)."""
    import os

    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration
    base = "a photography of red green blue cat dog circle square and on the left".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(base) | set(words))]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizer(os.path.join(folder, "vocab.txt"))
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         encoder_hidden_size=32, pad_token_id=0, bos_token_id=2, sep_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        projection_dim=32)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_grounded_sam(folder: str, words=("cat", "dog", "red", "circle", "square")):
    """Tiny random Grounding-DINO (+ BERT word tokenizer) and SAM saved under `folder`; returns
    the two folder paths. Random weights detect nothing meaningful: tests use them for shapes and
    the no-detection path."""
    import os

    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessorPil,
        SamModel,
        SamProcessor,
        SwinConfig,
    )
    gd, sm = os.path.join(folder, "gdino"), os.path.join(folder, "sam")
    os.makedirs(gd, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]
    with open(os.path.join(gd, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4,
                                   image_size=64, out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
        num_feature_levels=2, encoder_n_points=2, decoder_n_points=2, max_text_len=32)
    GroundingDinoForObjectDetection(cfg).save_pretrained(gd)
    size = {"shortest_edge": 64, "longest_edge": 64}
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(size=size),
                           tokenizer=BertTokenizer(os.path.join(gd, "vocab.txt"))
                           ).save_pretrained(gd)
    scfg = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16, output_channels=16, window_size=2,
                           global_attn_indexes=[0], mlp_dim=32, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 mlp_dim=16, iou_head_hidden_dim=16))
    SamModel(scfg).save_pretrained(sm)
    SamProcessor(image_processor=SamImageProcessorPil(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(sm)
    return gd, sm
