"""comat.py: gradcheck of every loss (float64, softmax of random logits), the vectorised losses
against a loop-by-loop transcription of the official formulas, known values, map collection on a
tiny UNet, and the discriminator's gradient flow."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import comat
import train
import unet as U

D64 = torch.float64


def problem(B=2, K=2, T=6, H=8, W=8, seed=0):
    """tokens (B, K, T), full-size masks (B, K, H, W) bool, valid (B, K); sample 1 has 1 object."""
    g = torch.Generator().manual_seed(seed)
    tokens = comat.object_tokens([[(1, 2), (4,)], [(3,)]], T=T, dtype=D64)
    masks = torch.rand(B, K, H, W, generator=g) > 0.6
    masks[1, 1] = False  # padding row
    valid = torch.tensor([[True, True], [True, False]])
    return tokens, masks, valid


def small_masks(masks, hw=(4, 4)):
    return comat.resize_masks(masks, hw, D64)


def ref_losses(maps, tokens, masks, valid):
    """Official formulas (docs/official-code.md 3.5), with loops: per sample, per layer, per object,
    per token; groups = resolutions; objects not kept are skipped, as comat.py documents."""
    B, K = valid.shape
    tok, pix = torch.zeros(B, dtype=D64), torch.zeros(B, dtype=D64)
    for b in range(B):
        objs = [k for k in range(K) if valid[b, k] and tokens[b, k].sum() > 0 and masks[b, k].any()]
        if not objs:
            continue
        groups = {}
        for A in maps:
            A = A[b]  # (heads, HW, T)
            r = int(A.shape[1] ** 0.5)
            M = comat.resize_masks(masks[b:b + 1], (r, r), D64)[0]  # (K, HW)
            groups.setdefault(r, []).append(A.mean(0))
            for k in objs:
                ts = tokens[b, k].nonzero().flatten().tolist()
                for s in ts:
                    a = sum((A[h, :, s] * M[k]).sum() / A[h, :, s].sum() for h in range(A.shape[0]))
                    tok[b] += (1 - a / A.shape[0]) ** 2 / len(ts) / len(objs)
        for r, g in groups.items():
            Abar = sum(g) / len(g)  # (HW, T)
            M = comat.resize_masks(masks[b:b + 1], (r, r), D64)[0]
            for k in objs:
                S = Abar[:, tokens[b, k] > 0].sum(-1)
                pix[b] += F.binary_cross_entropy(S, M[k]) / len(objs)
    return tok, pix


def test_gradcheck_token_and_pixel_loss():
    torch.manual_seed(0)
    tokens, masks, valid = problem()
    m = small_masks(masks)
    logits = torch.randn(2, 2, 16, 6, dtype=D64, requires_grad=True)  # (B, heads, HW, T)
    assert gradcheck(lambda x: comat.token_loss(x.softmax(-1), tokens, m, valid), (logits,))
    assert gradcheck(lambda x: comat.pixel_loss(x.softmax(-1).mean(1), tokens, m, valid), (logits,))


def test_gradcheck_attention_loss():
    torch.manual_seed(0)
    tokens, masks, valid = problem()
    # CFG-batched (2B) maps at two resolutions, different head counts
    shapes = [(4, 2, 16, 6), (4, 3, 16, 6), (4, 2, 4, 6)]
    logits = [torch.randn(s, dtype=D64, requires_grad=True) for s in shapes]

    def f(*xs):
        return torch.cat(comat.attention_loss([x.softmax(-1) for x in xs], tokens, masks, valid))
    assert gradcheck(f, tuple(logits))


def test_relation_loss_reads_where_each_object_is_attended():
    """--w_rel: the centre of each object's attention, and a hinge when "A left of B" has B's
    centre less than the margin to the right of A's; zero without a relation; gradcheck."""
    tokens = comat.object_tokens([[(1,), (2,)]] * 3, T=4, dtype=D64)  # (3, 2, 4)
    attn = torch.full((3, 1, 16, 4), 0.01, dtype=D64)  # (B, heads, HW, T) on a 4x4 map
    attn[:, 0, 4, 1] = attn[:, 0, 7, 2] = 1.0  # A's word at row 1 col 0, B's at row 1 col 3
    c = comat.attention_centroids(attn.mean(1), tokens)  # (B, K, 2)
    assert c[0, 0, 0] < 0.25 and c[0, 1, 0] > 0.75 and torch.allclose(c[0, :, 1], c[0, 0, 1])
    direction = torch.tensor([[1, 0], [-1, 0], [0, 0]], dtype=D64)  # left of, right of, none
    loss = comat.relation_loss([attn], tokens, direction, margin=0.1, cond_half=False)
    assert loss[0] == 0 and loss[1] > 0.5 and loss[2] == 0  # B is right of A: "right of" fails
    logits = torch.randn(6, 2, 16, 4, dtype=D64, requires_grad=True)  # CFG-batched, 2 heads
    assert gradcheck(lambda x: comat.relation_loss([x.softmax(-1)], tokens, direction, 0.3),
                     (logits,))


def test_exchange_reversed_swaps_masks_only_where_the_relation_is_drawn_backwards():
    """--relation_masks: "A left of B" drawn with B on the left gets A's and B's masks exchanged;
    drawn right, without a relation, with an object not found, or with one mask for both (two
    circles), the masks are left alone."""
    masks = torch.zeros(5, 3, 8, 8, dtype=torch.bool)
    masks[:, 0, 2:4, 5:7] = masks[:, 1, 2:4, 0:2] = True  # A drawn right of B
    masks[:, 2, 6:, 6:] = True  # a third object, never moved
    masks[4, 1] = masks[4, 0]  # one mask for both
    found = torch.ones(5, 3, dtype=torch.bool)
    found[3, 1] = False
    direction = torch.tensor([[1, 0], [-1, 0], [0, 0], [1, 0], [1, 0]])  # left, right, none
    out = comat.exchange_reversed(masks, found, direction)
    assert torch.equal(out[0, 0], masks[0, 1]) and torch.equal(out[0, 1], masks[0, 0])
    assert torch.equal(out[1:], masks[1:]) and torch.equal(out[:, 2], masks[:, 2])
    above = masks.transpose(-1, -2)  # A drawn below B: "A above B" (y down) is reversed
    flipped = comat.exchange_reversed(above, found, torch.tensor([[0, 1]] * 5))
    assert torch.equal(flipped[0, 0], above[0, 1]) and torch.equal(flipped[3:], above[3:])


def test_gradcheck_gan_losses():
    torch.manual_seed(0)
    real = torch.randn(2, 4, 4, dtype=D64, requires_grad=True)
    fake = torch.randn(2, 4, 4, dtype=D64, requires_grad=True)
    assert gradcheck(comat.g_loss, (fake,))
    assert gradcheck(comat.d_loss, (real, fake))
    zero = torch.zeros(3, 5, 5, dtype=D64)
    log2 = torch.full((3,), 0.6931471805599453, dtype=D64)
    torch.testing.assert_close(comat.g_loss(zero), log2)
    torch.testing.assert_close(comat.d_loss(zero, zero), log2)
    # official D loss: one BCE mean over the joint batch [fake; real], targets 0 / 1
    target = torch.cat([torch.zeros_like(fake), torch.ones_like(real)])
    bce = F.binary_cross_entropy_with_logits(torch.cat([fake, real]), target)
    torch.testing.assert_close(comat.d_loss(real, fake).mean(), bce)
    torch.testing.assert_close(comat.caption_loss(log2), -log2)


def test_matches_official_loops():
    torch.manual_seed(0)
    tokens, masks, valid = problem()
    maps = [torch.randn(s, dtype=D64).softmax(-1) for s in [(2, 2, 16, 6), (2, 3, 16, 6),
                                                            (2, 2, 4, 6), (2, 4, 64, 6)]]
    tok, pix = comat.attention_loss(maps, tokens, masks, valid, cond_half=False)
    ref_tok, ref_pix = ref_losses(maps, tokens, masks, valid)
    torch.testing.assert_close(tok, ref_tok)
    torch.testing.assert_close(pix, ref_pix)
    # cond_half takes the second half of a [uncond; cond] batch
    junk = [torch.rand_like(m) for m in maps]
    tok2, pix2 = comat.attention_loss([torch.cat([j, m]) for j, m in zip(junk, maps)], tokens,
                                      masks, valid)
    torch.testing.assert_close((tok2, pix2), (tok, pix))


def test_known_values():
    torch.manual_seed(0)
    tokens, masks, valid = problem()
    m = small_masks(masks)  # (B, K, 16)
    # Attention of each object's tokens exactly inside its mask: token loss 0.
    logits = torch.randn(2, 2, 16, 6, dtype=D64)
    for b, k in [(0, 0), (0, 1), (1, 0)]:
        out = (m[b, k] == 0)[None, :, None] & (tokens[b, k] > 0)[None, None, :]  # (1, HW, T)
        logits[b].masked_fill_(out, float("-inf"))
    zero = torch.zeros(2, dtype=D64)
    torch.testing.assert_close(comat.token_loss(logits.softmax(-1), tokens, m, valid), zero)
    # A 0/1 map whose object column equals the mask is the pixel-loss minimum (0).
    attn = torch.zeros(2, 16, 6, dtype=D64)
    one = torch.tensor([[True, False]] * 2)  # only object 0 of each sample
    attn[0, :, 1], attn[1, :, 3] = m[0, 0], m[1, 0]
    attn[:, :, 5] = 1 - attn.sum(-1)  # the rest of each row on an unrelated token
    best = comat.pixel_loss(attn, tokens, m, one)
    assert (best == 0).all()
    soft = torch.randn(2, 16, 6, dtype=D64).softmax(-1)
    assert (comat.pixel_loss(soft, tokens, m, one) > best).all()
    # Away from the clamps the written-out BCE is torch's BCELoss.
    S = (soft @ tokens.transpose(1, 2))[0, :, 0]
    torch.testing.assert_close(comat.pixel_loss(soft, tokens, m, one)[0],
                               F.binary_cross_entropy(S, m[0, 0]))


def test_invalid_and_empty_objects():
    torch.manual_seed(0)
    tokens, masks, valid = problem()
    masks[0, 1] = False  # object 1 of sample 0 was not found: no mask
    maps = [torch.randn(2, 2, 16, 6, dtype=D64, requires_grad=True)]
    for found in (False, True):  # even marked valid, a maskless object contributes nothing
        v = valid.clone()
        v[0, 1] = found
        tok, pix = comat.attention_loss([maps[0].softmax(-1)], tokens, masks, v, cond_half=False)
        one = comat.attention_loss([maps[0].softmax(-1)], tokens[:, :1], masks[:, :1],
                                   v[:, :1], cond_half=False)
        torch.testing.assert_close((tok, pix), one)
    # No objects at all: 0, and a finite (zero) gradient.
    none = torch.zeros(2, 2, dtype=torch.bool)
    tok, pix = comat.attention_loss([maps[0].softmax(-1)], tokens, masks, none, cond_half=False)
    assert (tok == 0).all() and (pix == 0).all()
    (tok + pix).sum().backward()
    assert torch.isfinite(maps[0].grad).all() and (maps[0].grad == 0).all()
    empty = comat.object_tokens([[], []], T=6, dtype=D64)  # K = 1 padding row
    assert empty.shape == (2, 1, 6) and empty.sum() == 0


def test_object_tokens_and_resize_masks():
    from collections import namedtuple
    Obj = namedtuple("Obj", "noun words tokens")
    t = comat.object_tokens([[Obj("cat", ("red", "cat"), (2, 3))], [(1,), (5, 6)]], T=8)
    assert t.shape == (2, 2, 8) and t.dtype == torch.float32
    assert t[0, 0].nonzero().flatten().tolist() == [2, 3] and t[0, 1].sum() == 0
    assert t[1, 1].nonzero().flatten().tolist() == [5, 6]
    m = torch.zeros(1, 2, 64, 64, dtype=torch.bool)
    m[0, 0, 20, 33] = True  # a single pixel survives the down-size (any coverage counts)
    m[0, 1, :32] = True
    r = comat.resize_masks(m, (8, 8))
    assert r.shape == (1, 2, 64) and set(r.unique().tolist()) <= {0.0, 1.0}
    assert r[0, 0].sum() >= 1 and r[0, 0].reshape(8, 8)[2, 4] == 1
    # dilation: the half-image mask grows past row 4 by the filter's reach, never shrinks
    assert r[0, 1].reshape(8, 8)[:4].all() and r[0, 1].reshape(8, 8)[4].all()
    assert not r[0, 1].reshape(8, 8)[6:].any()


def test_non_square_masks():
    torch.manual_seed(0)
    tokens = comat.object_tokens([[(1,)]], T=4, dtype=D64)
    masks = torch.zeros(1, 1, 16, 32, dtype=torch.bool)
    masks[..., :16] = True  # left half of a 16x32 image
    logits = torch.randn(1, 2, 8, 4, dtype=D64)  # a 2x4 map (HW = 8)
    logits.view(1, 2, 2, 4, 4)[:, :, :, 3:, 1] = float("-inf")  # token 1 off the right column
    tok, pix = comat.attention_loss([logits.softmax(-1)], tokens, masks,
                                    torch.ones(1, 1, dtype=torch.bool), cond_half=False)
    # the dilating resize keeps columns 0-2 of 4, where all of token 1's attention lies
    torch.testing.assert_close(tok, torch.zeros(1, dtype=D64))
    assert pix > 0


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_collect_maps_from_unet(kind):
    torch.manual_seed(0)
    cfg = U.TINY_SD15 if kind == "sd15" else U.TINY_SDXL
    net = U.UNet(cfg).double()
    names = [n for n, m in U.cross_attentions(net) if any(m is x for x in comat.loss_modules(net))]
    assert names and all(n.startswith(("mid_block.", "up_blocks.")) for n in names)
    assert len(names) == cfg.mid_depth + sum(d * (cfg.n_res + 1) for d in cfg.depth)
    assert len(comat.loss_modules(net, ("down",))) == sum(d * cfg.n_res for d in cfg.depth)
    mods = comat.loss_modules(net)
    for m in mods:
        m.store = True
    B, T = 1, 6
    x = torch.randn(2 * B, 4, 8, 8, dtype=D64)
    ctx = torch.randn(2 * B, T, cfg.ctx_dim, dtype=D64)
    extra = (torch.randn(2 * B, 32, dtype=D64), torch.ones(2 * B, 6, dtype=D64)) if cfg.adm_dim \
        else ()
    net(x, 500, ctx, *extra)
    maps = comat.attention_maps(mods)
    assert len(maps) == len(mods) and all(not m.probs for m in mods)
    assert all(a.shape[0] == 2 * B and a.shape[-1] == T for a in maps)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones_like(maps[0][..., 0]))
    tokens = comat.object_tokens([[(1, 2)]], T=T, dtype=D64)
    masks = torch.zeros(B, 1, 64, 64, dtype=torch.bool)
    masks[:, :, :, :24] = True
    tok, pix = comat.attention_loss(maps, tokens, masks, torch.ones(B, 1, dtype=torch.bool))
    (tok + pix).sum().backward()
    up_k = [m.to_k.weight.grad for m in mods]
    assert all(g is not None and g.abs().sum() > 0 for g in up_k)


def test_discriminator_gradients_reach_head_and_lora():
    torch.manual_seed(0)
    net = U.UNet(U.TINY_SD15)
    net.requires_grad_(False)  # frozen base, as in the official D (4.1)
    # LoRA lives in unet.py (add_lora); test it when present, else the head alone.
    lora = U.add_lora(net, 4) if hasattr(U, "add_lora") else []
    D = comat.Discriminator(net)
    z = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(1, 5, 32).expand(2, 5, 32)  # one empty-prompt embedding for the batch
    logits = D(z, 1, ctx)
    assert logits.shape == (2, 8, 8)
    (comat.g_loss(logits).sum() + comat.d_loss(logits, -logits).sum()).backward()
    assert D.head.weight.grad.abs().sum() > 0 and D.head.bias.grad.abs().sum() > 0
    trainable = {n for n, p in D.named_parameters() if p.requires_grad}
    assert all(p.grad is None for n, p in D.named_parameters() if n not in trainable)
    if lora:
        assert any("lora" in n for n in trainable)
        # lora_B starts at zero, so only it (not lora_A) gets a nonzero gradient at step 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in D.named_parameters() if "lora_B" in n)


def test_shared_discriminator_is_the_copy_on_one_base():
    """--disc shared: D on the generator's own frozen UNet with a second LoRA set gives the
    copied discriminator's logits and gradients, at init and once both sets have moved apart,
    with gradient checkpointing (whose recomputation runs after the switch back); the
    generator's set gets no gradient from D."""
    torch.manual_seed(0)
    base = U.UNet(U.TINY_SD15).requires_grad_(False)
    torch.manual_seed(1)
    copied = comat.Discriminator(train.copy_unet(base))
    U.add_lora(copied.unet, 4)
    torch.manual_seed(1)  # the shared D draws what the copy drew, then the generator's set
    shared = comat.SharedDiscriminator(base, 4)
    U.add_lora(base, 4)
    assert not any(k.startswith("shared") or "base" in k for k in shared.state_dict())
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    assert torch.equal(shared(z, 1, ctx), copied(z, 1, ctx))
    with torch.no_grad():  # both sets trained apart: the generator's, and D's (in both Ds)
        for name, (A, B) in zip(shared.names, shared.lora):
            base.get_submodule(name).lora_B.weight.normal_()
            B.weight.normal_()
            copied.unet.get_submodule(name).lora_B.weight.copy_(B.weight)
    assert not torch.allclose(base(z, 1, ctx), copied.unet(z, 1, ctx), atol=1e-3)
    base.gradient_checkpointing = copied.unet.gradient_checkpointing = True
    logits = []
    for D in (shared, copied):
        x = z.clone().requires_grad_(True)
        out = D(x, 1, ctx)
        out.square().sum().backward()
        grads = [D.head.weight.grad] + [copied.unet.get_submodule(n).lora_B.weight.grad
                                        if D is copied else B.weight.grad
                                        for n, (A, B) in zip(shared.names, shared.lora)]
        logits.append((out, x.grad, grads))
    (o_s, x_s, g_s), (o_c, x_c, g_c) = logits
    torch.testing.assert_close(o_s, o_c, rtol=0, atol=0)
    torch.testing.assert_close(x_s, x_c, rtol=0, atol=0)  # what flows back to the generator
    for a, b in zip(g_s, g_c):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(p.grad is None for p in base.parameters())  # the generator's set: untouched
