"""Pictures for people: loss curves and cross-attention heat-maps as PNG, drawn with PIL only.

Shapes: B batch, heads, HW attention pixels (a square h*h), T text tokens, K objects.
Usage: loss_curve(rows, "curve.png"); labelled_grid([("base", images)], prompts, "grid.png");
heatmaps(image, attn, objs, "attn.png")
"""
import math
import os
import tempfile

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


def save_png(img, path):
    """Write atomically (temp file in the same folder, then rename): never a half-written PNG."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    img.save(tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a picture is for people to open
    os.replace(tmp, path)


def to_pil(img):
    """An image (3, H, W) in about [0, 1] as a PIL RGB picture (clamped, rounded)."""
    arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0) * 255).round()
    return Image.fromarray(arr.to(torch.uint8).cpu().numpy())


def save_images(images, path, cols):
    """Write one PNG (a grid when several images), atomically: temp file, then rename."""
    b, _, h, w = images.shape
    rows = (b + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(to_pil(img), ((i % cols) * w, (i // cols) * h))
    save_png(grid, path)


def font(size=14):
    """PIL's own scalable font (no font file to find); its bitmap font where FreeType is absent."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def ema(values, decay):
    """Exponential moving average with bias correction (Adam's), so it starts at the first value."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay**i))
    return out


def loss_curve(rows, path, keys=("loss", "cap", "tok", "pix", "adv", "d"), size=(720, 170)):
    """One panel per loss term over the logged steps: the raw values faint, their EMA (span about
    a tenth of the run) over them, step ticks on the x axis, the value range on the y axis."""
    keys = [k for k in keys if any(k in r for r in rows)]
    w, h = size
    left, right, top_pad, bottom = 78, 16, 24, 26  # room for value labels, title, step labels
    img = Image.new("RGB", (w, h * max(len(keys), 1)), "white")
    draw, f, small = ImageDraw.Draw(img), font(15), font(12)
    for j, k in enumerate(keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
        y0, y1 = j * h + top_pad, (j + 1) * h - bottom  # the plot box, in pixels
        x0, x1 = left, w - right
        draw.rectangle([x0, y0, x1, y1], outline=(170, 170, 170))
        if not pts:
            draw.text((x0, j * h + 4), f"{k}: no finite values", fill=(0, 0, 0), font=f)
            continue
        s0, s1 = pts[0][0], pts[-1][0]
        v0, v1 = min(p[1] for p in pts), max(p[1] for p in pts)
        if v1 - v0 < 1e-12:  # a flat line sits mid-panel
            v0, v1 = v0 - 0.5, v1 + 0.5

        def xy(s, v):
            return (x0 + (s - s0) / max(s1 - s0, 1) * (x1 - x0),
                    y1 - (v - v0) / (v1 - v0) * (y1 - y0))
        smooth = ema([v for _, v in pts], 1 - 1 / max(len(pts) / 10, 1))
        if len(pts) > 1:
            draw.line([xy(*p) for p in pts], fill=(185, 200, 240), width=1)  # raw, faint
            draw.line([xy(s, v) for (s, _), v in zip(pts, smooth)], fill=(20, 60, 200), width=3)
        else:
            x, y = xy(*pts[0])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 60, 200))
        for n in range(5):  # y axis: the value range, top, bottom and three between
            v = v1 - n / 4 * (v1 - v0)
            y = xy(s0, v)[1]
            draw.line([x0 - 4, y, x0, y], fill=(120, 120, 120))
            draw.text((x0 - 6, y), f"{v:.3g}", fill=(60, 60, 60), font=small, anchor="rm")
        for n in range(6):  # x axis: step numbers
            s = round(s0 + n / 5 * (s1 - s0))
            x = xy(s, v0)[0]
            draw.line([x, y1, x, y1 + 4], fill=(120, 120, 120))
            draw.text((x, y1 + 5), str(s), fill=(60, 60, 60), font=small, anchor="ma")
        draw.text((x0, j * h + 4), f"{k}   last {pts[-1][1]:.4g}, smoothed {smooth[-1]:.4g}   "
                  f"(steps {s0}-{s1}; faint: each step, bold: moving average)", fill=(0, 0, 0),
                  font=f)
    save_png(img, path)


def labelled_grid(rows, prompts, path, tile=128):
    """Rows of images (each (n, 3, H, W) in [0, 1], one per prompt) with their label on the left
    ("base", "fine-tuned, step 300") and each column's prompt under the grid, wrapped; tiles are
    upscaled to `tile` px (nearest: a 64 px toy picture stays sharp) so labels and pictures read
    at the same size."""
    n = max(len(images) for _, images in rows)
    label_w, gap, f = 150, 4, font(15)
    lines = [wrap(p, f, tile) for p in prompts[:n]]
    text_h = 4 + 18 * max((len(ln) for ln in lines), default=0)
    grid = Image.new("RGB", (label_w + n * (tile + gap), len(rows) * (tile + gap) + text_h),
                     "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (tile + gap)
        for i, line in enumerate(wrap(label, f, label_w - 10)):
            draw.text((6, y + tile // 2 - 9 + 18 * i), line, fill=(0, 0, 0), font=f)
        for c, img in enumerate(images):
            pic = to_pil(img)
            resample = Image.NEAREST if tile % pic.width == 0 else Image.BICUBIC
            x = label_w + c * (tile + gap)
            grid.paste(pic.resize((tile, tile), resample), (x, y))
            draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=(210, 210, 210))
    y = len(rows) * (tile + gap) + 2
    for c, ln in enumerate(lines):
        for i, line in enumerate(ln):
            draw.text((label_w + c * (tile + gap), y + 18 * i), line, fill=(40, 40, 40), font=f)
    save_png(grid, path)


def wrap(text, f, width):
    """Words of `text` in lines no wider than `width` pixels (a longer word gets its own line)."""
    lines = []
    for word in text.split():
        if lines and f.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


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
        grid.paste(to_pil(t), (i * W, 0))
    draw = ImageDraw.Draw(grid)
    for i, lab in enumerate(["image", *labels]):
        draw.text((i * W + 2, H + 1), lab[: W // 6], fill=(0, 0, 0))
    save_png(grid, path)
