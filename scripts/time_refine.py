"""Seconds per image of segment() with each post-processing option (refine.py), random weights, no download:

    OMP_NUM_THREADS=1 python scripts/time_refine.py --backbone tiny --size 448 --threads 1
    python scripts/time_refine.py --backbone clip-b16 --device cuda

AnyUp runs with random weights (the cost does not depend on their values).  One warm-up call, then the median of
--repeats; the text is 21 classes, one template.  Prints one line per option and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import segment  # noqa: E402
from anyup import AnyUp  # noqa: E402
from cli import UserError, synchronize  # noqa: E402
from student import load_backbone  # noqa: E402

OPTIONS = {"none": {}, "lposs": dict(refine="lposs"), "lposs+": dict(refine="lposs+"), "anyup": dict(upsample="anyup")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--size", type=int, default=448, help="a square image of this side, run at its own size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--options", default=",".join(OPTIONS), help="comma-separated, of " + ", ".join(OPTIONS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone, None, args.device)
    classes = [[f"class {i}"] for i in range(21)]
    try:
        text = segment.text_embeddings(backbone, classes, ["a photo of a {}."], cache_dir=False)
    except UserError as e:  # SigLIP2 offline: no tokenizer; the image side costs the same with random text
        print(f"note: random text embeddings ({e})")
        emb = torch.nn.functional.normalize(torch.randn(21, backbone.dim), dim=-1).to(backbone.device)
        text = segment.ClassText([c[0] for c in classes], [c[0] for c in classes], torch.arange(21), emb)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    weights = os.path.join(tempfile.mkdtemp(), "anyup_random.pth")
    torch.save(AnyUp().state_dict(), weights)
    print(f"{args.backbone}, {args.size}x{args.size}, {args.device}, threads {torch.get_num_threads()}, 21 classes")
    for name in args.options.split(","):
        kw = dict(OPTIONS[name], **({"anyup_weights": weights} if name == "anyup" else {}))
        s = segment.SegmentSettings(**kw)
        times = []
        for _ in range(args.repeats + 1):
            synchronize(backbone.device)
            t0 = time.perf_counter()
            segment.segment(backbone, image.to(backbone.device), text, s)
            synchronize(backbone.device)
            times.append(time.perf_counter() - t0)
        print(
            f"  {name:<7} {statistics.median(times[1:]):8.3f} s/image   (runs: {', '.join(f'{t:.2f}' for t in times)})"
        )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
