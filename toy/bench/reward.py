"""Is a toy captioner's reward semantic? The four measurements of docs/toy-world.md,
for one or more captioner folders, on scenes no captioner was trained on (seed 1234):
(a) pixel-space ascent of a wrong prompt (one colour or shape changed) within a small RMS budget:
    how much its log-likelihood rises (nats per token);
(b) the same ascent within a large budget: on how many images the analytic evaluator then reads
    the wrong prompt's object (the colour or shape flipped);
(c) off-grammar pictures (world.render_odd: blends, melted and merged shapes, duplicates,
    noise): the prompt's log-likelihood on them vs on the clean renders of the same scenes;
(d) binding: on clean two-object renders (two colours, two shapes), the true prompt vs the
    same prompt with the two colours swapped; and a render with an extra copy of one of its
    shapes vs the clean render.
(e) the same reward on the base model's own samples (on_samples);
(f) in the space the generator reaches (reachable): ascent on the VAE latent of a clean render
    through the decoder towards a recoloured, colour-swapped or relation-flipped prompt; does the
    reward prefer the target only where the evaluator reads it? For three rewards: the captioner
    on the whole image (concept matching), each object alone (train.py --w_obj's term) and
    their sum (--w_obj 1); "A+B" in --captioners (f only) is train.py --captioner A,B: the
    whole image read by the mean of A and B, the objects by A.
Writes a JSON of the figures, a markdown table and a PNG of the ascents (per captioner, a row at
the small and a row at the large budget, under the clean renders).
Usage: python -m toy.bench.reward --captioners OLD_FOLDER,toy/model/captioner [--n 16]
       [--out runs/reward] [--only-samples | --only-reach]
       python -m toy.bench.reward --only-reach --captioners A,A+B
"""
import argparse
import json
import os
from functools import cache, partial

import numpy as np
import torch

import toy
import train
import viz
import weights
from captioner import caption_logprob, load_captioner
from segment import objects, shapes
from toy import build as tb
from toy import world as tw

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALL, LARGE, ASCENT_STEPS = 0.03, 0.25, 40  # RMS budgets (images in [0, 1]) and PGD steps


def with_copy(scene: tw.Scene, rng) -> tw.Scene:
    """The scene plus a copy of one of its shapes in a free spot (the scene itself if none)."""
    boxes = [(o.cx - o.size / 2, o.cy - o.size / 2, o.cx + o.size / 2, o.cy + o.size / 2)
             for o in scene.objects]
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    at = tw._free_box(boxes, int(o.size), rng)
    if at is None:
        return scene
    copy = o._replace(cx=at[0] + o.size / 2, cy=at[1] + o.size / 2)
    return scene._replace(objects=scene.objects + (copy,))


def scenes_for(n: int, seed: int = 1234):
    """n one-object scenes with a one-word confusion each, n two-object scenes with two different
    colours and shapes (half spatial), and n mixed scenes for the off-grammar kinds."""
    rng = np.random.default_rng(seed)
    one = [tw.sample_scene(rng, "one") for _ in range(n)]
    wrong = [tb.confuse(tw.prompt(s), rng) for s in one]
    two = []
    while len(two) < n:
        s = tw.sample_scene(rng, ("two", "spatial")[len(two) % 2])
        a, b = s.objects  # two colours AND two shapes: otherwise the swap is also true
        if a.colour != b.colour and a.shape != b.shape:
            two.append(s)
    mixed = [tw.sample_scene(rng, ("one", "two", "spatial")[i % 3]) for i in range(n)]
    return one, wrong, two, mixed, rng


def measure(cap, n: int, seed: int = 1234) -> tuple[dict, torch.Tensor]:
    """All four measurements for one captioner; also the ascended images (2n, 3, 64, 64)."""
    one, wrong, two, mixed, rng = scenes_for(n, seed)
    lp = lambda x, texts: caption_logprob(cap, x, texts).detach()  # noqa: E731
    x = tw.to_float(np.stack([tw.render(s) for s in one]))
    true = [tw.prompt(s) for s in one]
    out, shown = {}, []
    for name, eps in (("small", SMALL), ("large", LARGE)):
        adv = tb.ascend(cap, x, wrong, eps, ASCENT_STEPS)
        shown.append(adv)
        out[f"{name}_rise_wrong"] = float((lp(adv, wrong) - lp(x, wrong)).mean())
        out[f"{name}_change_true"] = float((lp(adv, true) - lp(x, true)).mean())
        out[f"{name}_wrong_wins"] = float((lp(adv, wrong) > lp(adv, true)).float().mean())
        out[f"{name}_reads_wrong"] = float(np.mean(
            [tw.score(img, w)["objects_ok"] for img, w in zip(tw.to_uint8(adv), wrong)]))
    prompts = [tw.prompt(s) for s in mixed]
    clean = lp(tw.to_float(np.stack([tw.render(s) for s in mixed])), prompts)
    out["clean_logp"] = float(clean.mean())
    for kind in tw.ODD_KINDS:
        odd = tw.to_float(np.stack([tw.render_odd(s, kind, rng) for s in mixed]))
        out[f"{kind}_logp"] = float(lp(odd, prompts).mean())
    x2 = tw.to_float(np.stack([tw.render(s) for s in two]))
    asked = [tw.prompt(s) for s in two]
    right, swapped = lp(x2, asked), lp(x2, [tb.swap_colours(p) for p in asked])
    out["binding_wins"] = float((right > swapped).float().mean())
    out["binding_margin"] = float((right - swapped).mean())
    base = one[: n // 2] + two[: n - n // 2]
    texts = [tw.prompt(s) for s in base]
    dup = tw.to_float(np.stack([tw.render(with_copy(s, rng)) for s in base]))
    clean2 = tw.to_float(np.stack([tw.render(s) for s in base]))
    out["duplicate_loses"] = float((lp(clean2, texts) > lp(dup, texts)).float().mean())
    return out, torch.cat([x] + shown)


REACH_BUDGETS, REACH_STEPS = (0.1, 0.3, 1.0), 10  # latent RMS budgets (x the latent's RMS)
REACH_TARGETS = ("recolour", "reshape", "swap", "swap_spatial", "flip_relation")
REWARDS = ("caption", "objects", "caption+objects")


def reach_key(reward: str, target: str, eps: float) -> str:
    """(f)'s result keys: the caption's unprefixed (as they were before the other rewards)."""
    return f"{'' if reward == 'caption' else reward + ':'}{target}_{eps:g}"


def rewards(caps, pipe) -> dict:
    """The rewards CoMat's generator can ascend with captioners `caps` (train.py --captioner
    A,B,...), as (images, prompts) -> (B,) log-likelihoods: the caption of the whole image
    (concept matching, train.read), each object alone (train.object_loss with the first
    captioner and the flat-shape segmenter, re-segmented at every call: --w_obj's term) and
    their sum."""
    parse = cache(partial(objects, pipe.tokenizers[0]))  # the same prompts at every ascent step

    def alone(x, prompts):
        objs = [parse(p) for p in prompts]
        masks, found = shapes(x.detach(), [[o.noun for o in ob] for ob in objs])
        return -train.object_loss(caps[0], x, objs, masks, found)
    whole = partial(train.read, caps)
    return dict(zip(REWARDS, (whole, alone, lambda x, p: whole(x, p) + alone(x, p))))


def reachable(caps, pipe, n: int, seed: int = 4321) -> dict:
    """(f) The reward where the generator can move an image: ascent on the toy VAE latent of a
    clean render (build.ascend_latent, through the decoder, as CoMat's gradient goes) towards a
    target prompt, per budget; n scenes per target: one object recoloured (the next palette
    colour) or reshaped (the next shape: what a wrong-shape failure needs), two objects (two
    colours, two shapes) with the colours swapped, and spatial pairs with the relation flipped.
    Per reward (rewards()), target and budget: the decoded image's RMS
    change, on how many images the evaluator reads the target (its objects, and its relation),
    how often the reward prefers the target to the truth, and how often it does so while the
    evaluator does not read the target (dishonest: the reward pays for something that is not
    there). Keys: reach_key(reward, target, budget) + "_{figure}"."""
    rng = np.random.default_rng(seed)
    after = dict(zip(tw.COLOURS, list(tw.COLOURS)[1:] + list(tw.COLOURS)[:1]))
    one, two, spatial = [], [], []
    while min(len(one), len(two), len(spatial)) < n:
        s = tw.sample_scene(rng, ("one", "two", "spatial")[int(rng.integers(3))])
        a, b = s.objects[0], s.objects[-1]
        if len(s.objects) == 1:
            one.append(s)
        elif a.colour != b.colour and a.shape != b.shape:  # else a swap says the same thing
            (spatial if s.relation else two).append(s)
    recolour = [s._replace(objects=(o._replace(colour=after[o.colour]),))
                for s in one[:n] for o in s.objects]
    targets = {"recolour": (one[:n], [tw.prompt(s) for s in recolour]),
               "reshape": (one[:n], [tb.reshape(tw.prompt(s)) for s in one[:n]]),
               "swap": (two[:n], [tb.swap_colours(tw.prompt(s)) for s in two[:n]]),
               "swap_spatial": (spatial[:n], [tb.swap_colours(tw.prompt(s)) for s in spatial[:n]]),
               "flip_relation": (spatial[:n], [tb.flip_relation(tw.prompt(s))
                                               for s in spatial[:n]])}
    with torch.no_grad():  # each target's clean latents, (n, 4, 16, 16)
        latents = {name: pipe.vae.encode(tb.images(scenes))[0] * pipe.vae.cfg.scale
                   for name, (scenes, _) in targets.items()}
    out = {}
    for rname, reward in rewards(caps, pipe).items():
        for name, (scenes, target) in targets.items():
            true, z = [tw.prompt(s) for s in scenes], latents[name]
            for eps in (0.0, *REACH_BUDGETS):
                _, img = tb.ascend_latent(reward, pipe, z, target, eps, REACH_STEPS if eps else 0)
                if not eps:
                    clean = img
                reads = np.array([tw.score(im, t)["bound"]
                                  for im, t in zip(tw.to_uint8(img), target)])
                with torch.no_grad():
                    prefers = (reward(img, target) > reward(img, true)).numpy()
                key = reach_key(rname, name, eps)
                out[key + "_pixel_rms"] = float((img - clean).pow(2).mean((1, 2, 3)).sqrt().mean())
                out[key + "_reads"] = float(reads.mean())
                out[key + "_prefers"] = float(prefers.mean())
                out[key + "_dishonest"] = float((prefers & ~reads).mean())
    return out


def label(folder: str) -> str:
    """A captioner folder's short name: its parent's when it is called captioner."""
    if "+" in folder:
        return "+".join(label(f) for f in folder.split("+"))
    parts = os.path.normpath(folder).split(os.sep)
    return "/".join(parts[-2:]) if parts[-1] == "captioner" and len(parts) > 1 else parts[-1]


def reach_table(results: dict) -> list[str]:
    """Markdown rows of (f): per captioner, reward, target and budget."""
    lines = ["| captioner | reward | target | latent budget | pixel RMS change | evaluator reads "
             "the target | reward prefers the target | ... while the evaluator does not |",
             "|---|---|---|---|---|---|---|---|"]
    for f, r in results.items():
        for rname in REWARDS:
            for name in REACH_TARGETS:
                for eps in (0.0, *REACH_BUDGETS):
                    k = reach_key(rname, name, eps)
                    lines.append(f"| {label(f)} | {rname} | {name} | {eps:g} | "
                                 f"{r[k + '_pixel_rms']:.3f} | {r[k + '_reads']:.0%} | "
                                 f"{r[k + '_prefers']:.0%} | {r[k + '_dishonest']:.0%} |")
    return lines


def on_samples(cap, pipe) -> dict:
    """(e) The reward on the generator's own images (the base model `pipe`): the 18 one-object
    prompts at seeds 0 and 1, asked-for shape vs the same colour with the next shape; the first 48
    training prompts at seed 0, log-likelihood when the evaluator finds both objects or not."""
    import sample
    one = tw.EVAL_PROMPTS["one"]  # circles, squares, triangles, six colours each
    other = one[6:12] + one[12:] + one[:6]
    x = torch.cat([sample.generate(pipe, one, 30, 7.5, 64, "ddim", s, progress=False)
                   for s in (0, 1)])
    lp = lambda x, texts: caption_logprob(cap, x, texts).detach()  # noqa: E731
    out = {"samples_shape_wins": float((lp(x, one * 2) > lp(x, other * 2)).float().mean())}
    train = [ln.strip() for ln in open(os.path.join(ROOT, "prompts.txt"))][:48]
    x2 = sample.generate(pipe, train, 30, 7.5, 64, "ddim", 0, progress=False)
    ok = torch.tensor([tw.score(img, p)["objects_ok"] for img, p in zip(tw.to_uint8(x2), train)])
    l2 = lp(x2, train)
    out["samples_logp_found"], out["samples_logp_not"] = float(l2[ok].mean()), float(l2[~ok].mean())
    return out


ROWS = [("(a) small-budget ascent: rise of the wrong prompt (nats/token)", "small_rise_wrong"),
        ("(a) small budget: wrong prompt beats the true one (share)", "small_wrong_wins"),
        ("(b) large-budget ascent: evaluator reads the wrong object (share)", "large_reads_wrong"),
        ("(b) large budget: rise of the wrong prompt", "large_rise_wrong"),
        ("(c) prompt log-lik, clean renders", "clean_logp"),
        *[(f"(c) prompt log-lik, {k}", f"{k}_logp") for k in tw.ODD_KINDS],
        ("(d) true beats colour-swapped prompt (share)", "binding_wins"),
        ("(d) true minus swapped (nats/token)", "binding_margin"),
        ("(d) extra duplicate shape loses to the clean render (share)", "duplicate_loses"),
        ("(e) base samples: asked-for shape beats another (share)", "samples_shape_wins"),
        ("(e) base samples: log-lik, both objects found", "samples_logp_found"),
        ("(e) base samples: log-lik, not found", "samples_logp_not")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captioners", default=toy.CAPTIONER,
                    help="comma-separated captioner folders; A+B: read together (--only-reach)")
    ap.add_argument("--n", type=int, default=16, help="scenes per measurement")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "reward"))
    ap.add_argument("--only-samples", action="store_true", help="print (e) only")
    ap.add_argument("--only-reach", action="store_true", help="(f) only: writes reach.md")
    a = ap.parse_args()
    torch.manual_seed(0)
    os.makedirs(a.out, exist_ok=True)
    folders = a.captioners.split(",")
    if not a.only_reach and any("+" in f for f in folders):
        raise SystemExit("error: --captioners A+B (read together) is measured with --only-reach")
    results, rows = {}, []
    pipe = weights.load(toy.MODEL)
    if a.only_reach:
        reach = {f: reachable([load_captioner(c) for c in f.split("+")], pipe, a.n)
                 for f in folders}
        lines = reach_table(reach)
        print("\n".join(lines))
        with open(os.path.join(a.out, "reach.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return
    for f in folders:
        cap = load_captioner(f)
        if a.only_samples:  # (e) alone: a minute, no ascents
            results[f] = on_samples(cap, pipe)
            print(f, json.dumps({k: round(v, 3) for k, v in results[f].items()}))
            continue
        res, imgs = measure(cap, a.n)
        res.update(on_samples(cap, pipe))
        res.update(reachable([cap], pipe, a.n))
        results[f] = res
        rows.append(imgs[a.n:] if rows else imgs)  # the clean renders once, then the ascents
        print(f, json.dumps({k: round(v, 3) for k, v in res.items()}))
    if a.only_samples:
        return
    lines = ["| measurement | " + " | ".join(folders) + " |", "|---" * (len(folders) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(f"{results[f][k]:.2f}" for f in folders) + " |"
              for label, k in ROWS]
    print("\n".join(lines))
    with open(os.path.join(a.out, "reward.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    lines += ["", *reach_table(results)]
    with open(os.path.join(a.out, "reward.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    k = min(a.n, 8)  # first k scenes: clean, then per captioner small and large budget
    grid = torch.cat([r.view(-1, a.n, 3, 64, 64)[:, :k].reshape(-1, 3, 64, 64) for r in rows])
    viz.save_images(grid, os.path.join(a.out, "ascent.png"), cols=k)


if __name__ == "__main__":
    main()
