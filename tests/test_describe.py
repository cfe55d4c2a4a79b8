"""Toy world's off-grammar pictures and their true descriptions (what the captioner learns to
say), and the validation split that training settings are chosen on."""
import numpy as np

from toy import world as tw


def scenes(seed, n):
    rng = np.random.default_rng(seed)
    return [tw.sample_scene(rng, kind) for kind in ("one", "two", "spatial") for _ in range(n)]


def test_describe_reads_what_is_there():
    # clean renders read as their "and"-prompt; a blank image as ""
    for scene in scenes(8, 30):
        words = tw.describe(tw.render(scene)).split(" and ")
        assert sorted(words) == sorted(f"a {o.colour} {o.shape}" for o in scene.objects)
    assert tw.describe(np.full((64, 64, 3), 255, np.uint8)) == ""
    scene = tw.Scene((tw.Obj("red", "square", 32, 32, 20),))
    img = tw.render(scene)
    img[img[..., 0] == 220] = (200, 100, 100)  # off-palette colour
    assert tw.describe(img) == "a mixed square"
    img = tw.render(scene)
    img[26:38, 36:50] = tw.COLOURS["red"]  # a bump: no template fits
    assert tw.describe(img) == "a red blob"
    img = tw.render(scene)
    img[2:4, 2:4] = img[60:62, 2:4] = img[2:4, 60:62] = img[60:62, 60:62] = (0, 0, 0)
    img[2:4, 30:32] = img[60:62, 30:32] = (0, 0, 0)  # 6 specks of 4 px
    assert tw.describe(img) == "a red square with noise"
    # the order is random with a generator, fixed without one
    two = tw.render(scenes(9, 1)[1])
    orders = {tw.describe(two, np.random.default_rng(s)) for s in range(8)}
    assert len(orders) == 2 and tw.describe(two) == tw.describe(two)


def test_odd_pictures_are_read_as_odd():
    # each way of drawing a scene wrongly is seen by the evaluator (hence by describe) on most
    # scenes; one kind at a time on the same 30 scenes
    rng = np.random.default_rng(10)
    batch = scenes(10, 10)
    share = {}
    for kind in tw.ODD_KINDS:
        texts = [tw.describe(tw.render_odd(s, kind, rng)) for s in batch]
        share[kind] = np.mean([{"blend": "mixed" in t, "melt": "blob" in t,
                                "merge": "blob" in t, "noise": "with noise" in t,
                                "duplicate": t.count(" and ") == len(s.objects)}[kind]
                               for t, s in zip(texts, batch)])
        img = tw.render_odd(batch[0], kind, rng)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert min(share.values()) >= 0.6, share
    merged = [tw.score(tw.render_odd(s, "merge", rng), tw.prompt(s)) for s in batch]
    assert np.mean([not r["clean"] and not r["correct"] for r in merged]) >= 0.8


def test_validation_prompts_are_held_out():
    val = [p for ps in tw.VAL_PROMPTS.values() for p in ps]
    taken = set(open(tw.PROMPTS_FILE).read().split("\n"))
    taken |= {p for ps in tw.EVAL_PROMPTS.values() for p in ps}
    assert len(val) == len(set(val)) == 48 and not set(val) & taken
    assert all(tw.parse_prompt(p).relation is None for p in tw.VAL_PROMPTS["two"])
    assert all(tw.parse_prompt(p).relation for p in tw.VAL_PROMPTS["spatial"])
