"""Table 1's last rows: SPAR's patch logits post-processed by LPOSS / LPOSS+ (lposs.py) or upsampled by AnyUp
(anyup.py) instead of bilinearly.  The glue between those two files and segment.py: the settings (flags of
segment.py and evaluate.py), the affinity features of LPOSS, the weights files (loaded once per process).

    --refine none      (E5) logits -> bilinear (segment.upsample_logits)                         SPAR
    --refine lposs     (E5) logits -> LPOSS over the patch graph (L1)-(L6) -> bilinear           LPOSS + SPAR
    --refine lposs+    ... -> bilinear to the run size -> LPOSS+ over pixels (L7)-(L10) -> bilinear to the output
    --upsample anyup   features -> AnyUp (U1)-(U5) at the output size -> (E5) logits, per query chunk   SPAR + AnyUp

Affinity features of LPOSS (`--affinity`): `self`, the dense features of the backbone in use (the distilled student's
own with --checkpoint; the only choice offline), or a DINO ViT weights file (the authors' choice: DINO ViT-B/16,
facebookresearch/dino's dino_vitbase16_pretrain.pth, whose keys are timm's VisionTransformer's): its last block's
value vectors (the qkv projection's v part, all heads) on the image zero-padded to a multiple of its patch, ImageNet
normalised, as in the authors' models/lposs/lposs.py; resized bilinearly to the logits' grid when the grids differ.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
import torch.nn.functional as F

from anyup import IMAGENET_MEAN, IMAGENET_STD, load_anyup
from checkpoints import load_state_dict_file
from cli import UserError, flag
from lposs import lposs, lposs_plus
from results import file_stamp

REFINES = ("none", "lposs", "lposs+")
LPOSS_K = 400  # the reference k (lposs.py's default): left out of records, so those made before --lposs-k match
UPSAMPLES = ("bilinear", "anyup")
ANYUP_HINT = "anyup_multi_backbone.pth from github.com/wimmerth/anyup's releases"


class RefineError(UserError):
    """Post-processing settings that do not fit (a missing weights file, a combination that does not exist)."""


@dataclass(frozen=True, kw_only=True)
class RefineSettings:
    """The post-processing fields of segment.SegmentSettings (keyword-only: they come after its own)."""

    refine: str = flag("none", "label propagation: lposs (patches), lposs+ (then pixels, Lab colour)", choices=REFINES)
    affinity: str = flag(
        "self", "LPOSS affinity features: self (the backbone in use, e.g. the student) or a DINO ViT weights file"
    )
    lposs_k: int = flag(
        LPOSS_K, "LPOSS's k nearest patches per patch, (L2) (400: the reference; see docs/lposs_anyup.md)", (">=", 1)
    )
    upsample: str = flag("bilinear", "logits to pixels: bilinear, or anyup (features by AnyUp)", choices=UPSAMPLES)
    anyup_weights: str | None = flag(None, f"the AnyUp weights file for --upsample anyup ({ANYUP_HINT})")

    def check_refine(self):
        """One sentence for settings that cannot run; the weights files are read (once) so a bad one fails here."""
        if self.refine not in REFINES or self.upsample not in UPSAMPLES:
            raise RefineError(
                f"unknown refine '{self.refine}' or upsample '{self.upsample}'; use one of {', '.join(REFINES)} "
                f"and one of {', '.join(UPSAMPLES)}."
            )
        if self.refine != "none" and self.upsample != "bilinear":
            raise RefineError(
                "--refine and --upsample anyup are separate rows of Table 1 (LPOSS + SPAR, SPAR + AnyUp); "
                "choose one of them."
            )
        if (self.refine != "none" or self.upsample != "bilinear") and getattr(self, "mode", "") == "slidelogit":
            raise RefineError(
                "--refine and --upsample anyup need the dense features, and mode slidelogit has only logits; "
                "use mode single or slide."
            )
        if self.lposs_k < 1:
            raise RefineError(f"--lposs-k must be at least 1, not {self.lposs_k}.")
        if self.upsample == "anyup":
            if not self.anyup_weights:
                raise RefineError(
                    f"--upsample anyup needs its learned weights: pass --anyup-weights PATH ({ANYUP_HINT})."
                )
            cached_model("anyup", self.anyup_weights, "cpu")
        if self.refine != "none" and self.affinity != "self":
            cached_model("dino", self.affinity, "cpu")


def run_record(args) -> dict:
    """The post-processing flags, checked (before any work), for evaluate.py's results settings; {} for the defaults,
    so results files from before these flags still resume.  A weights file is recorded by path and content."""
    from files import content_sha1

    RefineSettings(**{f.name: getattr(args, f.name, f.default) for f in fields(RefineSettings)}).check_refine()
    post = getattr(args, "refine", "none") != "none" or getattr(args, "upsample", "bilinear") != "bilinear"
    if post and "slidelogit" in getattr(args, "modes", ""):
        raise RefineError("--refine and --upsample anyup need the dense features; leave out the slidelogitN modes.")
    record = {}
    if getattr(args, "refine", "none") != "none":
        affinity = args.affinity
        record.update(refine=args.refine, affinity=affinity)
        if getattr(args, "lposs_k", LPOSS_K) != LPOSS_K:  # the reference k is left out: older records resume
            record.update(lposs_k=args.lposs_k)
        if affinity != "self":
            record.update(affinity=os.path.abspath(affinity), affinity_sha1=content_sha1(affinity))
    if getattr(args, "upsample", "bilinear") != "bilinear":
        weights = args.anyup_weights and os.path.abspath(args.anyup_weights)
        record.update(upsample=args.upsample, anyup_weights=weights, anyup_sha1=weights and content_sha1(weights))
    return record


# ----------------------------------------------------------------------------------------------------------------
# Weights files: AnyUp, DINO (timm)
# ----------------------------------------------------------------------------------------------------------------


def build_dino(state: dict) -> torch.nn.Module:
    """timm's VisionTransformer shaped like a DINO state dict (ViT-S/B, patch 8/16): width, depth, patch and
    position grid read from its tensors, 64 channels per head, no classifier."""
    from timm.models.vision_transformer import VisionTransformer

    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if not (torch.is_tensor(proj) and proj.ndim == 4 and torch.is_tensor(pos) and pos.ndim == 3):
        raise RefineError(
            "the --affinity file is not a DINO ViT state dict (no patch_embed.proj.weight / pos_embed); give "
            "facebookresearch/dino's dino_vitbase16_pretrain.pth or a file with timm's VisionTransformer keys."
        )
    dim, patch, grid = proj.shape[0], proj.shape[-1], round((pos.shape[1] - 1) ** 0.5)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return VisionTransformer(
        img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=max(1, dim // 64),
        num_classes=0, dynamic_img_size=True,
    )  # fmt: skip


def load_dino(path: str) -> torch.nn.Module:
    """A DINO ViT from a weights file (a plain state dict, or {"state_dict": ...}), strictly by key name."""
    if not os.path.isfile(path):
        raise RefineError(f"--affinity '{path}' is neither 'self' nor a file; give 'self' or a DINO ViT weights file.")
    from checkpoints import _read_torch_file

    state = _read_torch_file(path, "DINO weights file")
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    model = build_dino(state)
    load_state_dict_file(model, path, "the DINO affinity model")
    return model.eval()


@lru_cache(maxsize=4)
def _cached(kind: str, path: str, stamp, device: str) -> torch.nn.Module:
    if device != "cpu":  # a copy: the CPU one stays where it is
        return copy.deepcopy(_cached(kind, path, stamp, "cpu")).to(device)
    return load_anyup(path) if kind == "anyup" else load_dino(path)


def cached_model(kind: str, path: str, device) -> torch.nn.Module:
    """The AnyUp / DINO model of a weights file on `device`, read once per process (again when the file changes)."""
    if kind == "anyup" and not os.path.isfile(path):
        raise RefineError(f"--anyup-weights '{path}' does not exist; give the AnyUp weights file ({ANYUP_HINT}).")
    return _cached(kind, os.path.abspath(path), file_stamp(path), str(torch.device(device)))


# ----------------------------------------------------------------------------------------------------------------
# Post-processing, one batch
# ----------------------------------------------------------------------------------------------------------------


def imagenet_normalize(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=rgb.device, dtype=rgb.dtype)[:, None, None]
    return (rgb - mean) / torch.tensor(IMAGENET_STD, device=rgb.device, dtype=rgb.dtype)[:, None, None]


def dino_values(model: torch.nn.Module, rgb: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> the last block's value vectors (B, ceil(H/p), ceil(W/p), C), the image
    zero-padded at the bottom/right to a multiple of the patch p and ImageNet-normalised (the authors' order)."""
    p = model.patch_embed.patch_size[0]
    H, W = rgb.shape[-2:]
    x = imagenet_normalize(F.pad(rgb, (0, -W % p, 0, -H % p)))
    out = {}
    hook = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: out.update(qkv=o))
    try:
        model.forward_features(x)
    finally:
        hook.remove()
    C = out["qkv"].shape[-1] // 3
    v = out["qkv"][:, model.num_prefix_tokens :, 2 * C :]  # (B, h w, C), the heads side by side
    return v.reshape(x.shape[0], x.shape[-2] // p, x.shape[-1] // p, C).float()


def affinity_features(s: RefineSettings, feats: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """LPOSS's affinity features on the grid of `feats` (B, h, w, C): `feats` itself, or DINO's (resized)."""
    if s.affinity == "self":
        return feats
    v = dino_values(cached_model("dino", s.affinity, rgb.device), rgb)
    if v.shape[1:3] != feats.shape[1:3]:
        v = F.interpolate(v.permute(0, 3, 1, 2), size=feats.shape[1:3], mode="bilinear", align_corners=False)
        v = v.permute(0, 2, 3, 1)
    return v


def refined_logits(cos, feats, rgb, out_hw, s: RefineSettings, upsample, head, patch: int) -> torch.Tensor:
    """Patch-grid cosine logits (B, Q, h, w) -> pixel logits (B, Q, *out_hw) by `s.refine` and `s.upsample`.

    feats: the dense features (B, h, w, C) (None in mode slidelogit); rgb: the image at the run size (B, 3, H, W) in
    [0, 1]; upsample(logits, out_hw=...): segment's bilinear resize from the run size; head: (..., C) -> (..., Q),
    the cosine (E5); patch: the backbone's patch size in pixels (LPOSS's distances)."""
    if s.refine == "none" and s.upsample == "bilinear":
        return upsample(cos, out_hw=out_hw)
    if feats is None:
        raise RefineError("--refine and --upsample anyup need the dense features; use mode single or slide.")
    if s.upsample == "anyup":
        model = cached_model("anyup", s.anyup_weights, rgb.device)
        return model(imagenet_normalize(rgb), feats.permute(0, 3, 1, 2), out_hw, head=head)  # (U1)-(U5), (E5)
    Z = lposs(cos, affinity_features(s, feats, rgb), patch=patch, k=s.lposs_k)  # (L1)-(L6)
    if s.refine == "lposs":
        return upsample(Z, out_hw=out_hw)
    run_hw = tuple(rgb.shape[-2:])
    Z = lposs_plus(upsample(Z, out_hw=run_hw), rgb)  # (L7)-(L10) at the run size, as the authors
    return Z if tuple(out_hw) == run_hw else F.interpolate(Z, size=out_hw, mode="bilinear", align_corners=False)
