"""SigLIP2 NaFlex B/16: the single-pass baseline of Table 1 and Fig. 3 (not a part of the method; the dense head is
`student.SigLIPBackbone`'s, unchanged).

NaFlex ("native flexible" resolution) resizes each image KEEPING ITS ASPECT RATIO so that its patch grid fits a
budget of patches (`max_num_patches`: 256 in the reference preprocessing; the model is trained with budgets up to
1024), and resizes its learned 16 x 16 position grid to that patch grid (bilinear, timm's `NaFlexEmbeds`).  One image
at a time needs no padding mask: all its patches are valid, so the packed sequence is the plain h x w grid.

* `naflex_grid`  -- the h x w patch grid of an H x W image for a budget (timm's `get_image_size_for_seq`, a binary
                    search for the largest aspect-preserving scale whose ceil grid fits), or the ceil grid for
                    "all" (`--naflex-patches`, parsed by `cli.patch_budget`);
* `build_naflex` -- open_clip's SigLIP2 B/16 (its text tower) with the image trunk replaced by timm's
                    `naflexvit_base_patch16_siglip` (weights `v2_webli` on the hub); random or a local state dict.
"""

from __future__ import annotations

import math

from checkpoints import BackboneError, _quiet_logging, load_state_dict_file, seeded

DEFAULT_PATCHES = 256  # the reference preprocessing's max_num_patches (and the --naflex-patches default)
TIMM_NAME = "naflexvit_base_patch16_siglip"


def naflex_grid(H: int, W: int, budget: int | None, p: int = 16) -> tuple[int, int]:
    """(h, w) with h * w <= budget and h / w ~ H / W (at least 1 x 1); budget None: (ceil(H/p), ceil(W/p))."""
    if budget is None:
        return max(math.ceil(H / p), 1), max(math.ceil(W / p), 1)
    from timm.data.naflex_transforms import get_image_size_for_seq

    _, (Ht, Wt) = get_image_size_for_seq((H, W), patch_size=p, max_seq_len=budget)
    return Ht // p, Wt // p


def build_naflex(spec, pretrained):
    """The open_clip SigLIP2 B/16 model with a NaFlex image trunk (`model.visual.trunk`), eval mode, frozen."""
    import open_clip
    import timm

    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = None
    if pretrained == "default":
        raise BackboneError(
            f"{spec.name} is not in open_clip's released model list; pass --pretrained PATH (an open_clip state "
            f"dict of ViT-B-16-SigLIP2-naflex: 'visual.trunk.*' NaFlexViT and 'text.*' keys) or --pretrained none."
        )
    with _quiet_logging(), seeded():  # random weights (replaced below by a file's): the same in every run
        model = open_clip.create_model(spec.openclip_name, pretrained=None)
        model.visual.trunk = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0)
    if pretrained is not None:
        load_state_dict_file(model, pretrained, spec.name)
    return model.eval().requires_grad_(False)
