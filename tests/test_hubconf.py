"""torch.hub entry points (hubconf.py), loaded offline exactly as a user would: torch.hub.load(repo, name,
source="local")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def hub(name, **kw):
    return torch.hub.load(str(ROOT), name, source="local", trust_repo=True, **kw)


def test_every_entry_point_has_a_docstring():
    import hubconf

    names = {n for n, f in vars(hubconf).items() if callable(f) and not n.startswith("_") and f.__module__ == "hubconf"}
    assert names == {"siglip2_b16", "clip_b16", "tiny", "spar_siglip2_b16", "spar_clip_b16", "teacher"}
    assert all(len(getattr(hubconf, n).__doc__ or "") > 40 for n in names)


def test_tiny_gives_dense_features_like_load_backbone():
    from student import load_backbone

    bb = hub("tiny", pretrained=None)
    x = bb.normalize(torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        got = bb.dense(x)
        want = load_backbone("tiny", None).dense(x)
    assert got.shape == (1, 6, 10, bb.dim)
    torch.testing.assert_close(got, want)
    assert not any(p.requires_grad for p in bb.parameters()) and not bb.model.training


@pytest.mark.parametrize("name,K,C", [("siglip2_b16", 512, 768), ("clip_b16", 224, 512)])
def test_real_architectures_offline_with_random_weights(name, K, C):
    bb = hub(name, pretrained=None)
    assert (bb.window, bb.patch_size, bb.dim) == (K, 16, C)


def test_spar_student_entry_loads_a_checkpoint(tmp_path):
    from checkpoints import save_student
    from student import load_backbone

    trained = load_backbone("tiny", None)
    with torch.no_grad():
        trained.blocks[-1].mlp.fc2.bias.add_(0.5)  # a "distilled" tower that differs from the base
    save_student(str(tmp_path / "student.pt"), trained, {"note": "test"})
    clip = hub("spar_clip_b16", checkpoint=None, pretrained=None)  # the checkpoint may be given later
    assert clip.name == "clip-b16"
    bb = torch.hub.load(str(ROOT), "tiny", source="local", pretrained=None, checkpoint=str(tmp_path / "student.pt"))
    torch.testing.assert_close(bb.blocks[-1].mlp.fc2.bias, trained.blocks[-1].mlp.fc2.bias)


def test_teacher_entry_matches_the_teacher_class():
    from student import load_backbone
    from teacher import Teacher

    t = hub("teacher", backbone="tiny", pretrained=None, stride=64)
    x = t.backbone.normalize(torch.rand(1, 3, 160, 192, generator=torch.Generator().manual_seed(1)))
    want = Teacher(load_backbone("tiny", None), stride=64)(x)
    torch.testing.assert_close(t(x), want)
    assert t.stride == 64


def test_help_prints_the_entry_docstring():
    code = "import torch; help(torch.hub.load('.', 'siglip2_b16', source='local', pretrained=None))"
    env = dict(os.environ, PAGER="cat", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "class SigLIPBackbone" in out.stdout and "attention-pool" in out.stdout
