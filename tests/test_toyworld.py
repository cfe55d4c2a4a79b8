"""Toy world: renderer, grammar, captions, analytic evaluator and shape segmenter agree."""
import os

import numpy as np
import pytest
import torch

import segment
import toy
from toy import world as tw

KINDS = ("one", "two", "spatial")


def scenes(seed, n=200):
    rng = np.random.default_rng(seed)
    return [tw.sample_scene(rng, kind) for kind in KINDS for _ in range(n)]


def test_renderer_and_evaluator_agree_on_clean_scenes():
    for scene in scenes(0):
        img = tw.render(scene)
        r = tw.score(img, tw.prompt(scene))
        assert r["correct"] and r["objects_ok"] and r["clean"] and not r["extra"], scene
        assert r["relation_ok"] is (True if scene.relation else None)
        found = sorted((f.colour, f.shape, f.cx, f.cy, f.size) for f in tw.detect(img))
        assert found == sorted((o.colour, o.shape, o.cx, o.cy, o.size) for o in scene.objects)


def test_palette_sizes_inside_and_no_overlap():
    assert tw.COLOURS == {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 220),
                          "yellow": (235, 200, 20), "purple": (140, 40, 180),
                          "cyan": (20, 190, 200)}
    for scene in scenes(1, 100):
        img = tw.render(scene)
        masks = [tw.shape_mask(o.shape, o.cx, o.cy, o.size) for o in scene.objects]
        for o, m in zip(scene.objects, masks):
            assert (img[m] == tw.COLOURS[o.colour]).all()  # exact colour, no blending
            ys, xs = np.nonzero(m)
            assert 16 <= max(np.ptp(xs), np.ptp(ys)) + 1 <= 28 and 16 <= o.size <= 28
            assert 0 <= o.cx - o.size / 2 and o.cx + o.size / 2 <= tw.SIZE  # fully inside
            assert 0 <= o.cy - o.size / 2 and o.cy + o.size / 2 <= tw.SIZE
        assert (img[~np.any(masks, 0)] == 255).all()  # everything else is white
        if len(masks) == 2:
            grown = masks[0].copy()  # one shape grown by a pixel must not touch the other
            grown[1:] |= masks[0][:-1]
            grown[:-1] |= masks[0][1:]
            grown[:, 1:] |= masks[0][:, :-1]
            grown[:, :-1] |= masks[0][:, 1:]
            assert not (grown & masks[1]).any()
            assert len(tw.detect(img)) == 2
            assert scene.relation is None or tw.holds(scene.relation, *scene.objects, margin=4)


def test_shapes_have_their_geometry():
    # the square fills its box, the circle about pi/4, the triangle about half; apex at the top
    for s in range(16, 29):
        c = 20 + s / 2  # integer corners, as placed scenes have
        fill = {sh: tw.shape_mask(sh, c, c, s).sum() / s ** 2 for sh in tw.SHAPES}
        assert fill["square"] == 1 and abs(fill["circle"] - np.pi / 4) < 0.05
        assert abs(fill["triangle"] - 0.5) < 0.06
        tri = tw.shape_mask("triangle", c, c, s).sum(1)
        rows = tri[tri > 0]
        assert (np.diff(rows) >= 0).all() and rows[-1] == s


def test_parse_prompt_round_trip_and_rejection():
    for scene in scenes(2, 50):
        spec = tw.parse_prompt(tw.prompt(scene))
        assert spec == tw.Scene(tuple(tw.Obj(o.colour, o.shape) for o in scene.objects),
                                scene.relation)
        assert tw.prompt(spec) == tw.prompt(scene)
    for cat in tw.EVAL_PROMPTS.values():
        for p in cat:
            assert tw.prompt(tw.parse_prompt(p)) == p
    for bad in ["", "a pink circle", "a red hexagon", "red circle", "a circle", "a red circle and",
                "a red circle next to a blue square", "a red circle above a blue square and",
                "A red circle", "a red  circle", "a red circle, a blue square"]:
        with pytest.raises(ValueError):
            tw.parse_prompt(bad)


def test_eval_prompts_fixed():
    e = tw.EVAL_PROMPTS
    assert len(e["one"]) == 18 and len(set(e["one"])) == 18
    assert len(e["two"]) == 24 and len(set(e["two"])) == 24
    assert len(e["spatial"]) == 24 and len(set(e["spatial"])) == 24
    for p in e["two"] + e["spatial"]:
        a, b = tw.parse_prompt(p).objects
        assert a.colour != b.colour and a.shape != b.shape
    assert [tw.parse_prompt(p).relation for p in e["spatial"]].count("above") == 6
    assert tw._eval_prompts() == e  # deterministic


def test_caption_dropping():
    rng = np.random.default_rng(3)
    for scene in scenes(3, 30):
        assert tw.caption(scene, rng, 0.0, 0.0) == tw.prompt(scene)
        one = tw.parse_prompt(tw.caption(scene, rng, 1.0, 0.0))
        assert len(one.objects) == 1 and one.relation is None
        assert one.objects[0] in [tw.Obj(o.colour, o.shape) for o in scene.objects]
        bare = tw.caption(scene, rng, 0.0, 1.0)
        assert not any(c in bare.split() for c in tw.COLOURS)
        assert bare == tw.prompt(scene._replace(objects=tuple(
            o._replace(colour="") for o in scene.objects))).replace("a  ", "a ")
    # a partial drop leaves e.g. "a circle and a blue square": some colour words, not all
    two = tw.Scene((tw.Obj("red", "circle"), tw.Obj("blue", "square")))
    caps = {tw.caption(two, rng, 0.0, 0.5) for _ in range(200)}
    assert caps == {"a red circle and a blue square", "a circle and a blue square",
                    "a red circle and a square", "a circle and a square"}
    shares = [len(tw.parse_prompt(tw.caption(two, rng, 0.3, 0.0)).objects) for _ in range(2000)]
    assert abs(shares.count(1) / 2000 - 0.3) < 0.05


def test_wrong_images_score_incorrect():
    scene = tw.Scene((tw.Obj("red", "circle", 16, 32, 20), tw.Obj("blue", "square", 48, 32, 20)),
                     "to the left of")
    img = tw.render(scene)
    assert tw.score(img, "a red circle to the left of a blue square")["correct"]
    assert tw.score(img, "a blue square to the right of a red circle")["correct"]
    assert tw.score(img, "a red circle and a blue square")["correct"]
    wrong_rel = tw.score(img, "a red circle to the right of a blue square")
    assert not wrong_rel["correct"] and wrong_rel["objects_ok"]
    assert wrong_rel["relation_ok"] is False
    assert not tw.score(img, "a red circle above a blue square")["correct"]  # dx dominates
    assert not tw.score(img, "a green circle and a blue square")["correct"]  # wrong colour
    assert not tw.score(img, "a red triangle and a blue square")["correct"]  # wrong shape
    assert not tw.score(img, "a blue circle and a red square")["correct"]  # swapped binding
    extra = tw.score(img, "a red circle")  # the blue square is an extra object
    assert not extra["correct"] and extra["objects_ok"] and extra["extra"]
    one = tw.render(tw.Scene(scene.objects[:1]))
    missing = tw.score(one, "a red circle and a blue square")
    assert not missing["correct"] and not missing["objects_ok"] and missing["clean"]
    blank = tw.score(np.full((64, 64, 3), 255, np.uint8), "a red circle")
    assert not blank["correct"] and not blank["clean"]


def test_noise_is_not_clean():
    rng = np.random.default_rng(4)
    for _ in range(5):
        noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        r = tw.score(noise, "a red circle")
        assert not r["clean"] and not r["correct"]
        assert not any(f.clean for f in tw.detect(noise))
    # a clean shape in an off-palette colour or with a ragged edge is not clean either
    scene = tw.Scene((tw.Obj("red", "square", 32, 32, 20),))
    img = tw.render(scene)
    img[img[..., 0] == 220] = (200, 100, 100)
    assert not tw.detect(img)[0].clean
    img = tw.render(scene)
    img[22:42:2, 22:30] = 255  # comb-like notches in the square
    assert not tw.score(img, "a red square")["clean"]


def test_segmenter_masks_are_the_rendered_shapes():
    torch.manual_seed(0)
    batch = scenes(5, 10)
    images = tw.to_float(np.stack([tw.render(s) for s in batch]))
    nouns = [[o.shape for o in s.objects] for s in batch]
    nouns[0] = nouns[0] + [sh for sh in tw.SHAPES if sh != nouns[0][0]]  # two absent nouns
    nouns[1] = []
    masks, found = segment.shapes(images, nouns)
    assert masks.shape == (30, 3, 64, 64) and masks.dtype == torch.bool
    assert found.shape == (30, 3) and found.dtype == torch.bool
    for b, (scene, names) in enumerate(zip(batch, nouns)):
        for k in range(3):
            if k >= len(names) or names[k] not in [o.shape for o in scene.objects]:
                assert not found[b, k] and not masks[b, k].any()
                continue
            want = np.zeros((64, 64), bool)  # union of every object of that shape (any colour)
            for o in scene.objects:
                if o.shape == names[k]:
                    want |= tw.shape_mask(o.shape, o.cx, o.cy, o.size)
            assert found[b, k] and torch.equal(masks[b, k], torch.from_numpy(want))  # IoU 1


def test_evaluate_perfect_and_blank_generators():
    def perfect(prompts, seed):
        rng = np.random.default_rng(seed)
        return tw.to_float(np.stack([tw.render(tw.place(tw.parse_prompt(p), rng))
                                     for p in prompts]))

    def blank(prompts, seed):
        return torch.ones(len(prompts), 3, 64, 64)

    def plus_one(prompts, seed):  # the right scene, and a shape nobody asked for in a free spot
        rng, out = np.random.default_rng(seed), []
        for p in prompts:
            scene = tw.place(tw.parse_prompt(p), rng)
            boxes = [(o.cx - o.size / 2, o.cy - o.size / 2, o.size) for o in scene.objects]
            free = next((x, y) for y in range(0, 49, 4) for x in range(0, 49, 4)
                        if all(x + 16 + 2 <= bx or bx + s + 2 <= x or y + 16 + 2 <= by
                               or by + s + 2 <= y for bx, by, s in boxes))
            extra = tw.Obj("cyan" if scene.objects[0].colour != "cyan" else "red", "square",
                           free[0] + 8, free[1] + 8, 16.0)
            out.append(tw.render(scene._replace(objects=scene.objects + (extra,))))
        return tw.to_float(np.stack(out))

    cats = ("one", "two", "spatial")
    assert tw.evaluate(perfect, [0, 1]) == {
        "one": 1.0, "two": 1.0, "spatial": 1.0, "overall": 1.0, "fidelity": 1.0, "missing": 0.0,
        **{f"{c}_{k}": 1.0 for c in cats for k in ("pairs", "binding")},
        **{f"{c}_extra": 0.0 for c in cats}}
    assert tw.evaluate(blank, [0]) == {
        "one": 0.0, "two": 0.0, "spatial": 0.0, "overall": 0.0, "fidelity": 0.0, "missing": 1.0,
        **{f"{c}_{k}": 0.0 for c in cats for k in ("pairs", "binding", "extra")}}
    r = tw.evaluate(plus_one, [0])  # binding intact, every image wrong by its extra shape
    assert all(r[c] == 0.0 and r[f"{c}_pairs"] == r[f"{c}_binding"] == r[f"{c}_extra"] == 1.0
               for c in cats)
    flip = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}

    def flipped(prompts, seed):  # the asked-for objects, the relation the other way round
        rng = np.random.default_rng(seed)
        specs = [tw.parse_prompt(p) for p in prompts]
        return tw.to_float(np.stack([tw.render(tw.place(
            s._replace(relation=flip.get(s.relation)), rng)) for s in specs]))
    r = tw.evaluate(flipped, [0], {"spatial": tw.EVAL_PROMPTS["spatial"]})
    assert r["spatial"] == r["spatial_binding"] == 0.0 and r["spatial_pairs"] == 1.0
    # uint8 <-> float conversion is exact
    img = tw.render(scenes(6, 1)[0])
    assert (tw.to_uint8(tw.to_float(img[None]))[0] == img).all()


def test_soft_noisy_renders_still_score():
    # a generated image has soft edges and a little noise: still read right, mostly clean
    rng = np.random.default_rng(7)
    results = []
    for scene in scenes(7, 30):
        img = tw.render(scene).astype(np.float64)
        img = (2 * img + np.roll(img, 1, 0) + np.roll(img, -1, 0) + np.roll(img, 1, 1)
               + np.roll(img, -1, 1)) / 6  # one small blur
        img = (img + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)
        results.append(tw.score(img, tw.prompt(scene)))
    assert all(r["correct"] for r in results)
    assert np.mean([r["clean"] for r in results]) > 0.85


def test_toy_data_holds_the_held_out_two_object_prompts():
    """toy/data/color_val.txt (evaluate.py --data toy/data) is EVAL_PROMPTS["two"], in order."""
    with open(os.path.join(toy.DATA, "color_val.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == tw.EVAL_PROMPTS["two"]


def test_failure_breakdown_tells_a_reversed_relation():
    """toy.bench.failures: a spatial prompt drawn as asked is correct and not reversed; drawn
    with the relation reversed (same objects), it is reversed; with an object missing, neither."""
    from toy.bench.failures import reading
    from toy.build import flip_relation
    rng = np.random.default_rng(3)
    for _ in range(5):
        scene = tw.sample_scene(rng, "spatial")
        text = tw.prompt(scene)
        if flip_relation(text) is None:
            continue
        asked = reading(tw.render(scene), text)
        assert asked["correct"] and not asked["reversed"]
        flipped = tw.place(tw.parse_prompt(flip_relation(text)), rng)
        assert reading(tw.render(flipped), text)["reversed"]
        alone = scene._replace(objects=scene.objects[:1], relation=None)
        assert not reading(tw.render(alone), text)["reversed"]
