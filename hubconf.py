"""torch.hub entry points: the backbones, the distilled SPAR students and the sliding-window teacher.

    import torch
    bb = torch.hub.load("path/to/this/repo", "tiny", source="local", pretrained=None)        # offline, random
    bb = torch.hub.load("path/to/this/repo", "siglip2_b16", source="local")                  # real weights (hub)
    spar = torch.hub.load("path/to/this/repo", "spar_siglip2_b16", source="local", checkpoint="student.pt")
    teacher = torch.hub.load("path/to/this/repo", "teacher", source="local", backbone="tiny", pretrained=None)
    feats = bb.dense(bb.normalize(images_0_1))                                                # (B, h, w, C), (E3)

Every entry point takes `pretrained` ("default": the paper's weights through open_clip, downloaded once and
cached; None: the exact architecture with random weights, no network; or a local open_clip weights file),
`checkpoint` (a distilled student: our student.pt or the authors' released .pth / .ckpt) and `device`, and returns
the documented `student.Backbone` (or `teacher.Teacher`), in eval mode with gradients off.
"""

from student import load_backbone
from teacher import Teacher

dependencies = ["torch", "timm", "open_clip"]


def siglip2_b16(pretrained="default", checkpoint=None, device="cpu"):
    """SigLIP2 ViT-B/16 at 512 px (open_clip hf-hub:timm/ViT-B-16-SigLIP2-512), dense head = the attention-pool
    value path; K = 512, p = 16, C = 768.  `pretrained=None` builds it with random weights offline."""
    return load_backbone("siglip2-b16", pretrained, device, checkpoint=checkpoint)


def clip_b16(pretrained="default", checkpoint=None, device="cpu"):
    """OpenCLIP ViT-B/16 (laion2b_s34b_b88k), MaskCLIP dense head; K = 224, p = 16, C = 512 (the paper's
    OpenCLIP rows).  `pretrained=None` builds it with random weights offline."""
    return load_backbone("clip-b16", pretrained, device, checkpoint=checkpoint)


def tiny(pretrained="default", checkpoint=None, device="cpu"):
    """The offline `tiny` backbone: SigLIP2's structure with 4 blocks of width 128, K = 128 (seeded random
    weights; `pretrained` may name a weights file such as the miniature experiment's runs/miniature/tiny.pt)."""
    return load_backbone("tiny", pretrained, device, checkpoint=checkpoint)


def spar_siglip2_b16(checkpoint, pretrained="default", device="cpu"):
    """A distilled SPAR student of SigLIP2 B/16: `checkpoint` is the student.pt that distill.py wrote (it replaces
    the image tower; the text tower comes from `pretrained`) or the authors' released .pth / .ckpt."""
    return load_backbone("siglip2-b16", pretrained, device, checkpoint=checkpoint)


def spar_clip_b16(checkpoint, pretrained="default", device="cpu"):
    """A distilled SPAR student of OpenCLIP B/16 (our student.pt or the authors' MaskCLIP .pth / .ckpt)."""
    return load_backbone("clip-b16", pretrained, device, checkpoint=checkpoint)


def teacher(backbone="siglip2-b16", stride=24, pretrained="default", device="cpu", batch_size=None):
    """The frozen sliding-window teacher (E1-E2): K x K windows at `stride` px (paper: 24), features stitched on
    the grid of `backbone.dense`.  Call it on a normalised (B, 3, H, W) batch: `t(t.backbone.normalize(x))`."""
    return Teacher(load_backbone(backbone, pretrained, device), stride=stride, batch_size=batch_size)
