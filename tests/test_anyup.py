"""Tests for anyup.py: output shapes at odd sizes, the output as a convex combination of the raw features (a
constant map stays constant), chunked == unchunked, each part against the release's formulation (LFU's channel
order, the RoPE, nn.MultiheadAttention with the full window mask), and strict loading of a fabricated weights
file in the released key layout."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyup  # noqa: E402
from anyup import AnyUp, AnyUpError, load_anyup  # noqa: E402
from cli import UserError  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AnyUp().eval()


def run(model, *args, **kw):
    with torch.no_grad():
        return model(*args, **kw)


# --------------------------------------------------------------------------------------------------------------
# what the output is
# --------------------------------------------------------------------------------------------------------------


def test_output_shapes_at_odd_sizes(model):
    image, feats = torch.randn(2, 3, 37, 53), torch.randn(2, 11, 5, 7)
    assert run(model, image, feats).shape == (2, 11, 37, 53)
    assert run(model, image, feats, out_hw=(19, 23)).shape == (2, 11, 19, 23)
    assert run(model, image, feats, out_hw=(61, 70)).shape == (2, 11, 61, 70)  # beyond the image's size


def test_constant_features_stay_constant_and_outputs_mix_inputs(model):
    """The values are the raw features: a constant map comes out as the same constant, and every output vector
    lies inside the per-channel range of its inputs."""
    torch.manual_seed(1)
    image = torch.randn(1, 3, 29, 31)
    c = torch.randn(6)
    out = run(model, image, c[None, :, None, None].expand(1, 6, 4, 5).contiguous())
    torch.testing.assert_close(out, c[None, :, None, None].expand_as(out), atol=1e-5, rtol=1e-5)
    feats = torch.randn(1, 6, 4, 5)
    out = run(model, image, feats)
    lo, hi = feats.amin(dim=(2, 3)), feats.amax(dim=(2, 3))
    assert torch.all(out >= lo[..., None, None] - 1e-5) and torch.all(out <= hi[..., None, None] + 1e-5)
    assert out.std(dim=(2, 3)).min() > 0.05  # not a constant: the inputs are mixed, not averaged away


def test_chunked_equals_unchunked(model):
    torch.manual_seed(2)
    image, feats = torch.randn(1, 3, 33, 40), torch.randn(1, 9, 6, 8)
    full = run(model, image, feats, chunk=None)
    for chunk in (1, 7, 40 * 3 + 5, 10**6):
        torch.testing.assert_close(run(model, image, feats, chunk=chunk), full, atol=1e-5, rtol=1e-5)


def test_a_chunk_only_sees_the_key_rows_its_windows_reach(model, monkeypatch):
    """Memory: with 4 output rows per chunk of a 64-row output over a 16-row grid, a chunk attends to at most
    ceil(4/64 * 16) + 2 * ceil(0.1 * 16) + 1 = 6 key rows, never the whole grid."""
    seen = []
    real = anyup.CrossAttention.forward

    def spy(self, q, k, v, allowed):
        seen.append((q.shape[1], k.shape[1]))
        return real(self, q, k, v, allowed)

    monkeypatch.setattr(anyup.CrossAttention, "forward", spy)
    run(model, torch.randn(1, 3, 64, 24), torch.randn(1, 5, 16, 6), chunk=4 * 24)
    assert len(seen) == 16 and all(n == 4 * 24 for n, _ in seen)
    assert max(m for _, m in seen) <= 6 * 6 < 16 * 6


def test_head_is_applied_per_chunk(model):
    torch.manual_seed(3)
    image, feats = torch.randn(1, 3, 21, 26), torch.randn(1, 8, 5, 6)
    T = F.normalize(torch.randn(4, 8), dim=-1)

    def head(f):  # (B, n, C) -> (B, n, Q): cosine logits (E5)
        return F.normalize(f, dim=-1) @ T.T

    full = run(model, image, feats)
    want = (F.normalize(full, dim=1).permute(0, 2, 3, 1) @ T.T).permute(0, 3, 1, 2)
    torch.testing.assert_close(run(model, image, feats, chunk=26 * 2, head=head), want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# each part as released
# --------------------------------------------------------------------------------------------------------------


def release_lfu(feats, basis):
    """anyup/layers/feature_unification.py: grouped conv, border-normalised, viewed (B, N, C, h, w)."""
    b, c, h, w = feats.shape
    k = basis.shape[-1]
    p = k // 2
    x = F.conv2d(F.pad(feats, (p, p, p, p)), basis.repeat(c, 1, 1, 1), groups=c)
    denom = F.conv2d(F.pad(torch.ones(1, 1, h, w), (p, p, p, p)), torch.ones(1, 1, k, k))
    return F.softmax((x / denom).view(b, basis.shape[0], c, h, w), dim=1).mean(dim=2)


def test_feature_unification_as_released(model):
    torch.manual_seed(4)
    lfu = model.key_features_encoder[0]
    for C in (3, 10, 130):
        feats = torch.randn(2, C, 5, 7)
        want = release_lfu(feats, lfu.basis.detach())
        for chunk in (1, 4, 64):
            torch.testing.assert_close(lfu(feats, chunk=chunk).detach(), want, atol=1e-6, rtol=1e-5)


def test_rope_as_released(model):
    rope = model.rope
    f = 100.0 ** torch.linspace(0, -1, 32)
    want = torch.zeros(2, 128)
    want[0, :64], want[1, 64:] = torch.cat([f, f]), torch.cat([f, f])
    torch.testing.assert_close(rope.freqs.detach(), want * 2 * torch.pi)
    torch.manual_seed(5)
    x = torch.randn(2, 128, 5, 7)
    xs, ys = torch.meshgrid(torch.linspace(0, 1, 5), torch.linspace(0, 1, 7), indexing="ij")
    coords = torch.stack((xs, ys), -1).view(1, 35, 2)  # anyup.utils.img.create_coordinate
    t = x.permute(0, 2, 3, 1).reshape(2, 35, 128)
    angle = coords @ rope.freqs.detach()
    t1, t2 = t.chunk(2, dim=-1)
    t = t * angle.cos() + torch.cat((-t2, t1), dim=-1) * angle.sin()
    torch.testing.assert_close(rope(x).detach(), t.view(2, 5, 7, 128).permute(0, 3, 1, 2))


def release_window_mask(Ho, Wo, h, w, ratio):
    """anyup/layers/attention/attention_masking.py: True where a query may NOT look."""
    r = (torch.arange(Ho, dtype=torch.float32) + 0.5) / Ho
    c = (torch.arange(Wo, dtype=torch.float32) + 0.5) / Wo
    pr, pc = torch.meshgrid(r, c, indexing="ij")
    r0, r1 = ((pr - ratio).clamp(0, 1) * h).floor().long(), ((pr + ratio).clamp(0, 1) * h).ceil().long()
    c0, c1 = ((pc - ratio).clamp(0, 1) * w).floor().long(), ((pc + ratio).clamp(0, 1) * w).ceil().long()
    rows_ok = (torch.arange(h) >= r0.reshape(-1, 1)) & (torch.arange(h) < r1.reshape(-1, 1))
    cols_ok = (torch.arange(w) >= c0.reshape(-1, 1)) & (torch.arange(w) < c1.reshape(-1, 1))
    return ~(rows_ok[:, :, None] & cols_ok[:, None, :]).reshape(Ho * Wo, h * w)


def test_cross_attention_as_released(model):
    """The release runs nn.MultiheadAttention(average_attn_weights=True) with the full mask, keeps only its
    attention weights and multiplies them with the raw values."""
    torch.manual_seed(6)
    blk = model.cross_decode
    Ho, Wo, h, w, C = 11, 13, 5, 6, 9
    q, k, v = torch.randn(2, 128, Ho, Wo), torch.randn(2, 128, h, w), torch.randn(2, C, h, w)
    with torch.no_grad():
        qq = blk.conv2d(q).flatten(2).transpose(1, 2)
        kk, vv = k.flatten(2).transpose(1, 2), v.flatten(2).transpose(1, 2)
        ca = blk.cross_attn
        mask = release_window_mask(Ho, Wo, h, w, 0.1)
        _, attn = ca.attention(ca.norm_q(qq), ca.norm_k(kk), kk, average_attn_weights=True, attn_mask=mask)
        want = (attn @ vv).view(2, Ho, Wo, C).permute(0, 3, 1, 2)
        for chunk in (None, 13, 50):
            torch.testing.assert_close(blk(q, k, v, chunk=chunk), want, atol=1e-5, rtol=1e-5)


def test_forward_is_the_release_composition(model):
    """anyup/model.py's forward written out with the release's LFU and attention; the keys see only each feature's
    direction (F / ||F||), so scaling the features by 3 scales the output by 3."""
    torch.manual_seed(8)
    image, feats = torch.randn(1, 3, 23, 27), torch.randn(1, 10, 5, 6)
    with torch.no_grad():
        e = model.rope(model.image_encoder(image))
        q = F.adaptive_avg_pool2d(model.query_encoder(e), (17, 19))
        k = F.adaptive_avg_pool2d(model.key_encoder(e), (5, 6))
        lfu = model.key_features_encoder
        unified = lfu[2](lfu[1](release_lfu(F.normalize(feats, dim=1), lfu[0].basis)))
        k = model.aggregation(torch.cat([k, unified], dim=1))
        blk = model.cross_decode
        qq, kk = blk.conv2d(q).flatten(2).transpose(1, 2), k.flatten(2).transpose(1, 2)
        ca, mask = blk.cross_attn, release_window_mask(17, 19, 5, 6, 0.1)
        _, attn = ca.attention(ca.norm_q(qq), ca.norm_k(kk), kk, average_attn_weights=True, attn_mask=mask)
        want = (attn @ feats.flatten(2).transpose(1, 2)).view(1, 17, 19, 10).permute(0, 3, 1, 2)
    out = run(model, image, feats, out_hw=(17, 19))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(model, image, 3 * feats, out_hw=(17, 19)), 3 * out, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# the released weights files: key layout, strict loading
# --------------------------------------------------------------------------------------------------------------

RELEASED_SHAPES = {  # a few keys of anyup_paper.pth / anyup_multi_backbone.pth (wimmerth/anyup's AnyUp())
    "image_encoder.0.weight": (128, 3, 1, 1),
    "image_encoder.1.block.0.weight": (128,),
    "image_encoder.1.block.2.weight": (128, 128, 1, 1),
    "image_encoder.2.block.5.weight": (128, 128, 1, 1),
    "key_encoder.0.weight": (128, 128, 1, 1),
    "query_encoder.2.block.3.bias": (128,),
    "key_features_encoder.0.basis": (128, 1, 5, 5),
    "key_features_encoder.1.block.2.weight": (128, 128, 1, 1),
    "cross_decode.cross_attn.norm_q.weight": (128,),
    "cross_decode.cross_attn.norm_k.weight": (128,),
    "cross_decode.cross_attn.attention.in_proj_weight": (384, 128),
    "cross_decode.cross_attn.attention.in_proj_bias": (384,),
    "cross_decode.cross_attn.attention.out_proj.weight": (128, 128),
    "cross_decode.conv2d.weight": (128, 128, 3, 3),
    "aggregation.0.weight": (128, 256, 3, 3),
    "aggregation.1.block.0.bias": (128,),
    "rope.freqs": (2, 128),
}


def fabricated_file(tmp_path, name="anyup_fabricated.pth", edit=None):
    torch.manual_seed(7)
    state = {k: torch.randn_like(v) for k, v in AnyUp().state_dict().items()}
    if edit:
        edit(state)
    path = tmp_path / name
    torch.save(state, path)
    return str(path), state


def test_state_dict_has_the_released_layout():
    state = AnyUp().state_dict()
    assert len(state) == 5 * 13 + 7 + 1  # 5 encoders of conv + 2 x 6, cross_decode 7, rope 1
    for key, shape in RELEASED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key


def test_load_a_file_in_the_released_layout(tmp_path):
    path, state = fabricated_file(tmp_path)
    m = load_anyup(path)
    assert not m.training
    for key, value in m.state_dict().items():
        assert torch.equal(value, state[key]), key
    image, feats = torch.rand(1, 3, 20, 24), torch.randn(1, 5, 4, 5)
    assert not torch.allclose(run(m, image, feats), run(load_anyup(None), image, feats))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.pop("rope.freqs"), ["missing", "rope.freqs"]),
        (lambda s: s.update({"cross_decode.extra.weight": torch.zeros(1)}), ["unexpected", "cross_decode.extra"]),
        (lambda s: s.update({"aggregation.0.weight": torch.zeros(128, 256, 1, 1)}), ["shape", "aggregation.0"]),
    ],
)
def test_strict_loading_names_what_does_not_fit(tmp_path, edit, words):
    path, _ = fabricated_file(tmp_path, edit=edit)
    with pytest.raises(UserError) as exc:
        load_anyup(path)
    text = str(exc.value)
    assert "\n" not in text and text.endswith(".") and all(w in text for w in words), text


def test_missing_or_garbage_file_is_one_sentence(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a torch file")
    for path in (str(tmp_path / "nope.pth"), str(bad)):
        with pytest.raises(UserError) as exc:
            load_anyup(path)
        assert "\n" not in str(exc.value) and str(exc.value).endswith(".")


@pytest.mark.parametrize(
    "image, feats, kw",
    [
        (torch.randn(1, 4, 16, 16), torch.randn(1, 5, 4, 4), {}),  # not RGB
        (torch.randn(2, 3, 16, 16), torch.randn(1, 5, 4, 4), {}),  # another batch
        (torch.randn(1, 3, 16, 16), torch.randn(1, 5, 1, 4), {}),  # a 1-row grid (reflect padding needs 2)
        (torch.randn(1, 3, 16, 16), torch.randn(5, 4, 4), {}),
        (torch.randn(1, 3, 16, 16), torch.randn(1, 5, 4, 4), {"chunk": 0}),
    ],
)
def test_bad_input_is_one_sentence(model, image, feats, kw):
    with pytest.raises(AnyUpError) as exc:
        run(model, image, feats, **kw)
    assert "\n" not in str(exc.value) and str(exc.value).endswith(".")
