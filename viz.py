"""Pictures for people: loss curves and cross-attention heat-maps as PNG, drawn with PIL only.

Shapes: B batch, heads, HW attention pixels (a square h*h), T text tokens, K objects.
Usage: loss_curve(rows, "curve.png"); heatmaps(image, attn, objs, "attn.png")
"""
import math
import os
import tempfile

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def save_png(img, path):
    """Write atomically (temp file in the same folder, then rename): never a half-written PNG."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    img.save(tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a picture is for people to open
    os.replace(tmp, path)


def save_images(images, path, cols):
    """Write one PNG (a grid when several images), atomically: temp file, then rename."""
    b, _, h, w = images.shape
    rows = (b + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        grid.paste(Image.fromarray(arr), ((i % cols) * w, (i // cols) * h))
    save_png(grid, path)


def loss_curve(rows, path, keys=("loss", "cap", "tok", "pix", "adv", "d"), size=(640, 120)):
    """One panel per loss term (min-max scaled, its range printed) over the logged steps."""
    keys = [k for k in keys if any(k in r for r in rows)]
    w, h = size
    img = Image.new("RGB", (w, h * max(len(keys), 1)), "white")
    draw = ImageDraw.Draw(img)
    for j, k in enumerate(keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
        top = j * h
        draw.rectangle([40, top + 15, w - 10, top + h - 15], outline=(200, 200, 200))
        if len(pts) < 2:
            continue
        s0, s1 = pts[0][0], pts[-1][0]
        v0, v1 = min(p[1] for p in pts), max(p[1] for p in pts)
        xy = [(40 + (s - s0) / max(s1 - s0, 1) * (w - 50),
               top + h - 15 - (v - v0) / max(v1 - v0, 1e-12) * (h - 30)) for s, v in pts]
        draw.line(xy, fill=(30, 70, 220), width=2)
        draw.text((45, top + 2), f"{k}: {v0:.4g} .. {v1:.4g} (steps {s0}-{s1})", fill=(0, 0, 0))
    save_png(img, path)


def heatmaps(image, maps, tokens, labels, path):
    """The image next to one heat-map per object: attention summed over the object's tokens.

    image (3, H, W) in [0, 1]; maps: stored probs (2B, heads, HW, T) of CFG-batched calls, whose
    finest resolution is averaged over heads and layers for sample 0's conditional half (index
    B); tokens (K, T) 0/1; labels K strings, drawn under each map.
    """
    fine = [m for m in maps if m.shape[2] == max(m.shape[2] for m in maps)]
    attn = torch.stack([m[len(m) // 2].float().mean(0) for m in fine]).mean(0)  # (HW, T)
    _, H, W = image.shape
    side = int(math.isqrt(attn.shape[0]))
    heat = (tokens.to(attn) @ attn.T).reshape(-1, 1, side, side)  # (K, 1, h, h)
    heat = F.interpolate(heat, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    heat = heat / heat.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]  # each map to [0, 1]
    image = image.detach().float().clamp(0, 1)
    tiles = [image] + [0.4 * image + 0.6 * torch.stack([m, 0.2 * m, 1 - m]) for m in heat]
    grid = Image.new("RGB", (W * len(tiles), H + 14), "white")
    for i, t in enumerate(tiles):
        arr = (t.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        grid.paste(Image.fromarray(arr), (i * W, 0))
    draw = ImageDraw.Draw(grid)
    for i, lab in enumerate(["image", *labels]):
        draw.text((i * W + 2, H + 1), lab[: W // 6], fill=(0, 0, 0))
    save_png(grid, path)
