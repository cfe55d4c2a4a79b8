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
