"""Focused autograder tests for the course assignments (assignments/README.md), run with `pytest -m aN`.

Each test compares a student-implemented function with an independent, loop-based reference (tests/reference.py
or a loop written here) on small cases, and says which case failed, what was expected and what came back.  They
check behaviour, not implementation details: any correct solution passes.  The project's other tests that touch
the same functions carry the same markers.
"""

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reference import bicubic_resize, starts_reference, stitch_reference

P = 16


def assert_close(got, expected, what: str, atol: float = 1e-5, rtol: float = 1e-5):
    """np.testing.assert_allclose with a message that names the case and both shapes first."""
    got = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    expected = np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: expected shape {expected.shape}, got {got.shape}"
    bad = ~np.isclose(got, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values differ; first at index {idx}: "
            f"expected {expected[idx]:.6g}, got {got[idx]:.6g}"
        )


# ---------------------------------------------------------------- every assignment: no borrowed reference

ROOT = Path(__file__).resolve().parents[1]


def _is_reference(name: str) -> bool:
    """A module name or path of tests/reference.py: reference, tests.reference(.x), tests/reference.py, ..."""
    name = name.strip().replace("\\", "/").removesuffix(".py").replace("/", ".")
    return name == "reference" or name.startswith("reference.") or "tests.reference" in name


def _reference_uses(path: Path) -> list[str]:
    """Where a project file imports the autograder's references (tests/reference.py): `import tests.reference`,
    `from tests import reference`, `from reference import ...`, importlib / __import__ / runpy on them."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    hits = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):  # importlib.import_module("reference"), runpy.run_path("tests/reference.py")
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if any(_is_reference(n) for n in names):
            hits.append(f"{path.name}:{node.lineno}")
    return hits


@pytest.mark.a1
@pytest.mark.a2
@pytest.mark.a3
@pytest.mark.a4
@pytest.mark.a5
@pytest.mark.a6
def test_no_solution_imports_the_autograders_reference():
    # tests/reference.py holds loop versions of what the assignments ask for, so that the tests can check any
    # correct solution; a solution that imports them would pass without being written.
    hits = [hit for path in sorted(ROOT.glob("*.py")) for hit in _reference_uses(path)]
    assert not hits, (
        f"the project's code must not use the autograder's loop references (tests/reference.py): found at "
        f"{', '.join(hits)}; write the assignment's code yourself (the sheet in assignments/ says how)"
    )


# ---------------------------------------------------------------- assignment 1: the window grid (E1)

CASES_E1 = [
    (512, 512, 24),
    (1024, 512, 24),
    (992, 512, 24),
    (700, 128, 24),
    (650, 128, 128),
    (129, 128, 24),
    (300, 64, 48),
    (64, 16, 5),
    (200, 48, 1),
]


@pytest.mark.a1
@pytest.mark.parametrize("length,window,stride", CASES_E1)
def test_a1_window_starts_match_a_while_loop(length, window, stride):
    got = list(window_starts_of(length, window, stride))
    expected = starts_reference(length, window, stride)
    assert got == expected, (
        f"window_starts(length={length}, window={window}, stride={stride}): expected "
        f"{len(expected)} starts {_short(expected)}, got {len(got)}: {_short(got)}"
    )
    assert all(isinstance(s, int) for s in got), f"starts must be Python ints, got {[type(s) for s in got][:3]}"


def window_starts_of(length, window, stride):
    from stitch import window_starts

    return window_starts(length, window, stride)


def _short(seq):
    seq = list(seq)
    return str(seq) if len(seq) <= 8 else f"[{', '.join(map(str, seq[:4]))}, ..., {', '.join(map(str, seq[-3:]))}]"


@pytest.mark.a1
@pytest.mark.parametrize(
    "H,W,K,stride", [(512, 512, 512, 24), (160, 208, 64, 24), (129, 300, 128, 48), (1024, 2048, 512, 24)]
)
def test_a1_window_grid_is_every_pair_row_major(H, W, K, stride):
    from stitch import window_grid

    expected = []
    for y in starts_reference(H, K, stride):
        for x in starts_reference(W, K, stride):
            expected.append((y, x))
    got = [tuple(c) for c in window_grid(H, W, K, stride)]
    assert len(got) == len(expected), (
        f"window_grid({H}, {W}, K={K}, s={stride}): expected {len(expected)} windows, got {len(got)}"
    )
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"window_grid({H}, {W}, K={K}, s={stride}): window #{i} should start at (y, x) = {e}, got {g}"


# ---------------------------------------------------------------- assignment 2: stitching (E2)


def _windows(H, W, K, stride, C, seed):
    rng = np.random.default_rng(seed)
    starts = [(y, x) for y in starts_reference(H, K, stride) for x in starts_reference(W, K, stride)]
    return [rng.standard_normal((K // P, K // P, C)).astype(np.float32) for _ in starts], starts


@pytest.mark.a2
def test_a2_add_puts_each_window_on_the_canvas_of_its_own_image():
    # One Stitcher holds the canvases of B images; a window of image b must be added to image b's canvas only.
    # Here every image gets ONE window covering its whole canvas (r = 1, a 4x4-cell window on a 4x4-cell
    # canvas), fed in the order of images 2, 0, 1, each map constant at b + 1.
    from stitch import Stitcher

    B, C = 3, 2
    order = torch.tensor([2, 0, 1])
    feats = (order.float() + 1)[:, None, None, None].expand(B, 4, 4, C).contiguous()
    st = Stitcher(B, (4, 4), C, 1)
    st.add(feats, order, torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long))
    try:
        out = st.result((4, 4))
    except RuntimeError as exc:
        raise AssertionError(
            f"Stitcher.add (assignment 2) with one full-canvas window for each of {B} images left cells of some "
            f"image uncovered ({exc}): the window grid is complete here, so add must put a window of image b on "
            f"image b's canvas, i.e. offset its cells by image_idx * Hc * Wc"
        ) from None
    for b in range(B):
        assert_close(out[b], torch.full((4, 4, C), b + 1.0), f"image {b}: its own window (value {b + 1}) only")


@pytest.mark.a2
@pytest.mark.parametrize(
    "H,W,K,stride", [(64, 64, 64, 24), (96, 160, 64, 24), (128, 96, 64, 16), (96, 96, 64, 20), (80, 112, 32, 8)]
)
def test_a2_stitcher_matches_the_loop_reference_for_two_images(H, W, K, stride):
    # Two images' windows fed to one Stitcher in shuffled batches of 3: each image must come out as the loop
    # reference stitches it alone (up_r, place on the canvas, divide by the coverage count, resize to h x w).
    from stitch import Stitcher, sub_patch_factor

    r = sub_patch_factor(stride, P)
    cell = P // r
    C = 3
    maps = [_windows(H, W, K, stride, C, seed) for seed in (0, 1)]
    starts = maps[0][1]
    feats = torch.from_numpy(np.stack(maps[0][0] + maps[1][0]))  # (2n, k, k, C)
    img = torch.tensor([0] * len(starts) + [1] * len(starts))
    yx = torch.tensor(starts * 2) // cell  # top-left cell of each window
    st = Stitcher(2, (H // cell, W // cell), C, r)
    order = torch.randperm(len(img), generator=torch.Generator().manual_seed(0))
    for chunk in order.split(3):
        st.add(feats[chunk], img[chunk], yx[chunk, 0], yx[chunk, 1])
    out = st.result((H // P, W // P))
    case = f"{H}x{W}, K={K}, stride {stride} (r={r})"
    assert tuple(out.shape) == (2, H // P, W // P, C), (
        f"Stitcher.result for {case}: expected shape (B, h, w, C) = {(2, H // P, W // P, C)}, got {tuple(out.shape)}"
    )
    for b in range(2):
        ref = stitch_reference(maps[b][0], starts, (H, W), P, r)
        assert_close(out[b], ref, f"image {b} of {case}")


@pytest.mark.a2
def test_a2_result_crops_the_padded_cells():
    # The canvas may be larger than the image's patch grid (the teacher pads to K); result((h, w)) keeps the
    # top-left h x w patches: here one 4x4-patch window (r = 2) and a 2x3 patch grid.
    from stitch import Stitcher

    fmap = torch.randn(1, 4, 4, 2, generator=torch.Generator().manual_seed(3))
    st = Stitcher(1, (8, 8), 2, 2)
    st.add(fmap, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    out = st.result((2, 3))
    ref = stitch_reference([fmap[0].numpy()], [(0, 0)], (64, 64), P, 2)[:2, :3]
    assert_close(out[0], ref, "one window, 8x8 canvas, cropped to a 2x3 patch grid")


@pytest.mark.a2
@pytest.mark.parametrize("stride", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 24, 25, 40, 48, 512])
def test_a2_sub_patch_factor_is_the_smallest_valid_r(stride):
    from stitch import sub_patch_factor

    valid = [r for r in range(1, P + 1) if P % r == 0 and stride % (P // r) == 0]
    got = sub_patch_factor(stride, P)
    assert got == valid[0], (
        f"sub_patch_factor(stride={stride}, patch={P}): expected {valid[0]} (the smallest r "
        f"dividing p with stride a multiple of p / r; valid: {valid}), got {got}"
    )


# ---------------------------------------------------------------- assignment 3: position embeddings (E3)


@pytest.fixture(scope="module")
def tiny():
    from student import load_backbone

    return load_backbone("tiny", None)


@pytest.mark.a4
@pytest.mark.parametrize("H,W", [(96, 160), (200, 40), (256, 256)])
def test_a3_tiny_student_uses_the_bicubic_position_grid(tiny, H, W):
    # The student at a non-native size: its features must equal those computed with position embeddings resized
    # by the loop-based bicubic reference.  Catches a resize that is right alone but wrong in layout or dtype.
    # Graded with assignment 4 (marker a4): the dense features go through the SigLIP2 head of assignment 4.
    import student

    bb = tiny
    g = bb.native_grid
    h, w = math.ceil(H / P), math.ceil(W / P)
    pos = bb.trunk.pos_embed.detach()  # (1, g*g, C)
    ref_pos = bicubic_resize(pos.reshape(*g, -1).double().numpy(), h, w).reshape(1, h * w, -1)
    got_pos = student.resize_pos_embed(pos, g, (h, w))
    assert_close(got_pos, ref_pos, f"resize_pos_embed of tiny's {g} grid to {(h, w)}", atol=1e-5, rtol=1e-4)
    x = bb.normalize(torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        got = bb.dense(x)
        bb.trunk.pos_embed.data = torch.from_numpy(ref_pos).float()
        try:  # the reference grid, resized "by itself" = as is
            original, student.resize_pos_embed = student.resize_pos_embed, lambda p, old, new, *a, **k: p
            expected = bb.dense(x)
        finally:
            student.resize_pos_embed = original
            bb.trunk.pos_embed.data = pos
    assert_close(got, expected, f"tiny's dense features at {H}x{W}", atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- assignment 4: the SigLIP2 dense head


@pytest.mark.a4
def test_a4_head_is_the_attention_pool_of_each_token_alone(tiny):
    # Attention over ONE key returns that key's value: the unmodified attention-pool head run on every token as
    # a sequence of length 1 is an independent way to compute the value-path head.
    tokens = torch.randn(2, 15, tiny.dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = tiny.head(tokens)
        expected = tiny.trunk.attn_pool(tokens.reshape(-1, 1, tiny.dim)).reshape(2, 15, -1)
    assert_close(
        got, expected, "head(tokens) of shape (2, 15, C) vs attn_pool on each token alone", atol=1e-5, rtol=1e-4
    )


@pytest.mark.a4
def test_a4_head_keeps_tokens_apart_and_is_used_by_dense(tiny):
    tokens = torch.randn(1, 6, tiny.dim, generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[0, 2] += 1.0
    with torch.inference_mode():
        a, b = tiny.head(tokens), tiny.head(changed)
        moved = (a - b).abs().amax(dim=-1)[0]
    assert moved[2] > 0, "changing token 2 must change its own output"
    others = [i for i in range(6) if i != 2 and moved[i] > 0]
    assert not others, f"changing token 2 changed the outputs of tokens {others}: the dense head must not mix tokens"
    x = tiny.normalize(torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(2)))
    with torch.inference_mode():
        tok, (h, w) = tiny.tokens(x)
        expected = tiny.trunk.attn_pool(tok.reshape(-1, 1, tiny.dim)).reshape(1, h, w, -1)
        got = tiny.dense(x)
    assert_close(got, expected, "dense(x) at 64x80 = the head on every token", atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- assignment 6: logits, synonyms, mIoU


def _text(classes_of_queries, C, seed=0):
    from segment import ClassText

    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(len(classes_of_queries), C, generator=g), dim=-1)
    K = max(classes_of_queries) + 1
    names = [f"class{k}" for k in range(K)]
    return ClassText(names, [f"q{i}" for i in range(len(classes_of_queries))], torch.tensor(classes_of_queries), emb)


@pytest.mark.a6
@pytest.mark.parametrize("B,h,w,C,Q", [(1, 3, 4, 8, 5), (2, 2, 5, 16, 3)])
def test_a6_query_logits_are_cosines(B, h, w, C, Q):
    from segment import query_logits

    text = _text(list(range(Q)), C)
    feats = torch.randn(B, h, w, C, generator=torch.Generator().manual_seed(1)) * 3  # not unit length
    got = query_logits(feats, text)
    f, t = feats.double().numpy(), text.embeddings.double().numpy()
    expected = np.zeros((B, Q, h, w))
    for b in range(B):
        for i in range(h):
            for j in range(w):
                for q in range(Q):
                    expected[b, q, i, j] = f[b, i, j] @ t[q] / np.linalg.norm(f[b, i, j])
    assert_close(
        got,
        expected,
        f"query_logits of features (B, h, w, C) = {(B, h, w, C)} and {Q} queries (expected (B, Q, h, w))",
        atol=1e-5,
    )


@pytest.mark.a6
@pytest.mark.parametrize("query_class", [[0, 1, 2], [0, 0, 1, 2, 2, 2], [0, 1, 1, 1]])
def test_a6_max_over_synonyms(query_class):
    from segment import max_over_synonyms

    text = _text(query_class, 4)
    scores = torch.randn(2, len(query_class), 3, 5, generator=torch.Generator().manual_seed(2))
    got = max_over_synonyms(scores, text)
    K = text.num_classes
    expected = np.full((2, K, 3, 5), -np.inf)
    for q, k in enumerate(query_class):
        expected[:, k] = np.maximum(expected[:, k], scores[:, q].numpy())
    assert_close(got, expected, f"max_over_synonyms with query classes {query_class} (expected (B, K, H, W))")


@pytest.mark.a6
@pytest.mark.parametrize("K", [2, 5])
def test_a6_confusion_counts_pairs_and_skips_ignored_pixels(K):
    from evaluate import confusion

    g = torch.Generator().manual_seed(K)
    label = torch.randint(0, K, (3, 7, 9), generator=g)
    label[0, :2] = 255
    pred = torch.randint(0, K, (3, 7, 9), generator=g)
    got = confusion(pred, label, K)
    expected = np.zeros((K, K), dtype=np.int64)
    for lb, pr in zip(label.reshape(-1).tolist(), pred.reshape(-1).tolist()):
        if lb != 255:
            expected[lb, pr] += 1
    assert_close(got, expected, f"confusion(pred, label, {K}) (rows = label, columns = prediction)", atol=0, rtol=0)


@pytest.mark.a6
def test_a6_miou_matches_a_loop():
    from evaluate import miou

    conf = np.array([[5, 1, 0, 0], [2, 7, 1, 0], [0, 0, 0, 0], [0, 3, 0, 4]])  # class 2: empty union
    iou = []
    for k in range(4):
        tp = conf[k, k]
        union = conf[k, :].sum() + conf[:, k].sum() - tp
        iou.append(tp / union if union > 0 else float("nan"))
    mean, per_class = miou(torch.tensor(conf))
    assert_close(per_class, iou, "per-class IoU = TP / (TP + FP + FN), NaN for an empty union")
    expected = np.nanmean(iou)
    assert mean == pytest.approx(expected), (
        f"mean IoU over classes with a non-empty union: expected {expected}, got {mean}"
    )


# ---------------------------------------------------------------- assignment 5: the distillation step (E4)


def _used_by_dense(backbone, x) -> set[str]:
    """Reference for "the parameters the dense path uses": perturb each image-tower parameter alone and see
    whether the dense features move (a loop over parameters, no autograd)."""
    used = set()
    with torch.no_grad():
        base = backbone.dense(x)
        for name, prm in backbone.image_tower().named_parameters():
            saved = prm.detach().clone()
            prm.add_(torch.randn_like(prm) * 0.1 + 0.1)
            if not torch.equal(backbone.dense(x), base):
                used.add(name)
            prm.copy_(saved)
    return used


@pytest.fixture(scope="module")
def used_by_dense(tiny):
    return _used_by_dense(tiny, tiny.normalize(torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))))


@pytest.mark.a5
@pytest.mark.parametrize(
    "parts,prefixes",
    [
        (["blk_-1", "blk_-2"], ("trunk.blocks.2.", "trunk.blocks.3.")),
        (["blk_0"], ("trunk.blocks.0.",)),
        (["all"], ("",)),
    ],
)
def test_a5_select_trainable_unfreezes_exactly_what_is_named_and_used(tiny, used_by_dense, parts, prefixes):
    import distill

    used = used_by_dense
    expected = {n for n, _ in tiny.image_tower().named_parameters() if n.startswith(prefixes) and n in used}
    try:
        names = distill.select_trainable(tiny, parts)
        got = {n for n, p in tiny.image_tower().named_parameters() if p.requires_grad}
        others = [n for n, p in tiny.model.named_parameters() if p.requires_grad and not n.startswith("visual.")]
        leftover = [n for n, p in tiny.model.named_parameters() if p.grad is not None]
    finally:
        tiny.requires_grad_(False)
        tiny.zero_grad(set_to_none=True)
    assert set(names) == got, (
        f"select_trainable({parts}) must return the names (relative to image_tower()) of "
        f"exactly the parameters it left trainable; returned but frozen: "
        f"{sorted(set(names) - got)[:5]}, trainable but not returned: {sorted(got - set(names))[:5]}"
    )
    assert got == expected, (
        f"select_trainable({parts}): missing {sorted(expected - got)[:5]}, should stay frozen "
        f"{sorted(got - expected)[:5]} (a parameter the dense features never use gets no "
        f"gradient and must stay frozen)"
    )
    assert not others, f"the text tower must stay frozen, but these are trainable: {others[:5]}"
    assert not leftover, f"select_trainable must not leave gradients behind: {leftover[:5]}"


@pytest.mark.a5
def test_a5_select_trainable_freezes_what_was_trainable_before(tiny, used_by_dense):
    # Training may start from a tower left trainable (a fine-tuned model, a previous call): select_trainable must
    # first freeze the whole image tower, so only the named parts train, whatever the state before.
    import distill

    def expect(prefixes):
        return {n for n, _ in tiny.image_tower().named_parameters() if n.startswith(prefixes) and n in used_by_dense}

    def trainable():
        return {n for n, p in tiny.image_tower().named_parameters() if p.requires_grad}

    try:
        tiny.image_tower().requires_grad_(True)  # a fully trainable tower
        first = distill.select_trainable(tiny, ["blk_-1"])
        after_first = trainable()
        second = distill.select_trainable(tiny, ["blk_0"])  # a second call, other parts
        after_second = trainable()
    finally:
        tiny.requires_grad_(False)
        tiny.zero_grad(set_to_none=True)
    assert after_first == set(first) == expect(("trunk.blocks.3.",)), (
        f"select_trainable(['blk_-1']) on a fully trainable tower must leave only the last block trainable; "
        f"still trainable but not named: {sorted(after_first - expect(('trunk.blocks.3.',)))[:5]}"
    )
    assert after_second == set(second) == expect(("trunk.blocks.0.",)), (
        f"select_trainable(['blk_0']) after select_trainable(['blk_-1']) must leave only block 0 trainable; "
        f"left over from the first call: {sorted(after_second - expect(('trunk.blocks.0.',)))[:5]}"
    )


@pytest.mark.a5
@pytest.mark.parametrize("H,W", [(128, 128), (96, 160)])
def test_a5_image_loss_is_the_mse_of_raw_features(tiny, H, W):
    # (E4): L = ||F_S - F_T||^2 / (h w C) with F_S the single pass on the stored uint8 image, checked with a loop
    # over the elements, and its gradient must reach the trainable blocks.
    import distill

    g = torch.Generator().manual_seed(H + W)
    img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
    h, w = math.ceil(H / P), math.ceil(W / P)
    target = torch.randn(h, w, tiny.dim, generator=g) * 0.1
    with torch.no_grad():
        feats = tiny.dense(tiny.normalize(img[None].float() / 255.0))[0].double().numpy()
    t = target.double().numpy()
    total = 0.0
    for i in range(h):
        for j in range(w):
            total += float(((feats[i, j] - t[i, j]) ** 2).sum())
    expected = total / (h * w * tiny.dim)
    last = tiny.blocks[-1]
    last.requires_grad_(True)
    try:
        loss = distill.image_loss(tiny, img, target, tiny, torch.device("cpu"), "fp32")
        assert loss.dim() == 0, f"image_loss must return a scalar, got shape {tuple(loss.shape)}"
        assert loss.item() == pytest.approx(expected, rel=1e-5), (
            f"image_loss on a {H}x{W} image ({h}x{w} patches, C={tiny.dim}): "
            f"expected MSE {expected:.6g}, got {loss.item():.6g}"
        )
        loss.backward()
        missing = [n for n, p in last.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, (
            f"the loss must be differentiable w.r.t. the trainable blocks; no gradient for {missing[:3]}"
        )
    finally:
        tiny.requires_grad_(False)
        tiny.zero_grad(set_to_none=True)
