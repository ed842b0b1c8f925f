"""Reading images and writing files safely: the plumbing every CLI shares (not a part of the paper).

* `read_rgb`     -- any image file -> 8-bit RGB (EXIF rotation applied, 16-bit / float images rescaled rather than
                    clipped, alpha composited on white); one-sentence `ImageError` for anything unreadable;
* `load_image`   -- the same as a (1, 3, H, W) float tensor in [0, 1], the input `Backbone.normalize` expects;
* `atomic_write` -- write a temp file next to the target, fsync, rename: a kill or a full disk leaves the old file
                    or the new one, never half of one; `write_json` and `save_torch` use it;
* `file_sha1`, `read_json`, `natural_key`, `list_images`, `clean_temp_files` -- hashes, small JSON records,
                    numeric file order, image folders, and temp files left by a killed writer;
* `lock` -- an exclusive `flock` on a folder, so that two runs never write the same outputs.

`python files.py IMAGE` prints what `read_rgb` makes of an image file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import sys
import warnings
from typing import TYPE_CHECKING

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch is imported where it is used: `python files.py --help` answers at once
    import torch

from cli import ArgumentParser, UserError, display_name, hxw, log

TEMP_MARK = ".tmp.spar-"  # temp files are "<target name>.tmp.spar-<pid>": a name no user would choose
TEMP_NAME = re.compile(r".+\.tmp\.spar-\d+")  # the full pattern: only files matching it are ever cleaned up


class ImageError(UserError):
    """An image file cannot be used. `reason` says why, `str()` is one sentence naming the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image '{path}' ({reason}).")
        self.path, self.reason = path, reason


class WriteError(UserError):
    """A file could not be written (full disk, no permission, ...). The message is one sentence."""


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float images are rescaled (not clipped), alpha is put on white."""
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im).astype(np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("its pixels are not all finite numbers")
        if im.mode.startswith("I") and lo >= 0 and hi <= 65535:  # 8-bit values in a 32-bit image, or 16-bit
            arr = arr / (65535.0 if im.mode.startswith("I;16") or hi > 255 else 255.0)
        elif im.mode == "F" and lo >= -1 and hi <= 1:  # float in [0, 1], or in [-1, 1] when it has negatives
            arr = (arr + 1) / 2 if lo < 0 else arr
        else:  # 32-bit integers beyond 16 bits, negative ones, floats in an unknown range: stretched, not clipped
            arr = (arr - lo) / max(hi - lo, 1e-12)
        return Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def read_rgb(path: str) -> Image.Image:
    """An image file as an 8-bit RGB PIL image (EXIF rotation applied); raises ImageError when it is unusable."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block forever, a device never end
            raise ImageError(path, "it is a pipe, device or folder, not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, before decoding
            with Image.open(path) as im:
                if limit and im.width * im.height > limit:
                    raise ImageError(
                        path,
                        f"its header claims {hxw(im.height, im.width)} px, more than the {limit}-pixel safety limit",
                    )
                im.load()
                im = ImageOps.exif_transpose(im) or im
                return to_rgb8(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"too large to decode safely ({str(exc).split(',')[0]})") from exc
    except FileNotFoundError as exc:
        raise ImageError(path, "no such file") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ImageError(path, reason) from exc


def load_image(path: str, max_side: int | None = None) -> torch.Tensor:
    """An image file as a (1, 3, H, W) float tensor in [0, 1] (RGB); optionally shrunk so max(H, W) <= max_side."""
    import torch

    im = read_rgb(path)
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through `write(fileobj)` to a temp file, fsync, then rename: readers see the old file or the new one."""
    path = os.fspath(path)
    tmp = temp_name(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # inside: a file in the way is a WriteError
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WriteError(
                f"no space left on the device while writing '{path}'; free some space and run the "
                f"same command again (finished work is kept)."
            ) from exc
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write '{display_name(path)}' ({_reason(exc)}); check the output folder.") from exc
        if isinstance(exc, RuntimeError):  # torch.save's zip writer reports a full disk this way, at close
            reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "RuntimeError"
            raise WriteError(
                f"cannot write '{path}' ({reason}); check the free space and permissions of the "
                f"output folder, then run the same command again (finished work is kept)."
            ) from exc
        raise


def temp_name(path: str) -> str:
    """The temp file beside `path` that `atomic_write` writes first: '<path>.tmp.spar-<pid>'."""
    return f"{path}{TEMP_MARK}{os.getpid()}"


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, in one sentence (WriteError), when `path` cannot be written: create its folder and a temp file
    beside it, then remove the temp file.  CLIs call this before the work, not after it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise WriteError(f"cannot write '{display_name(path)}': it is a folder; give a file name.")
    probe = temp_name(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise WriteError(f"cannot write '{display_name(path)}' ({_reason(exc)}); check the output folder.") from exc


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # makedirs / open under a path that is a file
        return "a file stands where a folder is needed"
    return exc.strerror or str(exc)


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def save_torch(path: str | os.PathLike, obj) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------------------------------------------
# Hashes, small JSON records, image folders, locks
# ----------------------------------------------------------------------------------------------------------------

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def file_sha1(path: str) -> str | None:
    """sha1 of a file's bytes, None when it cannot be read (a stored PNG is verified before it is trusted)."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


_SHA1_MEMO: dict[tuple, str | None] = {}


def content_sha1(path: str) -> str | None:
    """`file_sha1` of a file, computed once per process for one version of the file (its inode, size, mtime and
    ctime, which no user can set back); None when it is not a file.  Caches key on this, not on names or sizes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA1_MEMO:
        _SHA1_MEMO[key] = file_sha1(path)
    return _SHA1_MEMO[key]


def read_json(path: str | os.PathLike):
    """The JSON in `path`, or None when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: sa_2.jpg before sa_10.jpg (SA-1B ids)."""
    return [int(tok) if i % 2 else tok for i, tok in enumerate(re.split(r"(\d+)", name))]  # odd: the digit runs


def regular_file(path: str) -> bool:
    """True for a readable regular file; a dangling link, a link loop, a pipe ... is logged as a skip."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return True
        reason = "not a regular file"
    except FileNotFoundError:
        reason = "a symbolic link to nothing (its target does not exist)"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__  # e.g. "Too many levels of symbolic links" (a loop)
    log(f"skip: '{path}': {reason}.")
    return False


def list_images(folder: str, error=UserError) -> list[str]:
    """Image files under `folder` (recursive, numbers in names sorted by value), as paths relative to it."""
    if not os.path.isdir(folder):
        raise error(f"image folder '{folder}' does not exist; pass --images DIR with your photos.")
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in names:
            if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".") and regular_file(os.path.join(root, f)):
                found.append(os.path.relpath(os.path.join(root, f), folder))
    if not found:
        raise error(f"no images ({', '.join(IMAGE_EXTS)}) found in '{folder}'; point --images at a folder of photos.")
    return sorted(found, key=lambda f: (natural_key(f), f))


def clean_temp_files(folder: str, legacy=None) -> int:
    """Remove temp files left by a killed `atomic_write` under `folder`: only names of our full pattern
    ('<name>.tmp.spar-<pid>'), or those that `legacy(relative path)` accepts (an older writer's names); never a
    finished file, never a file of the user's (a 'thesis.tmp.tex' is not ours)."""
    n = 0
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if TEMP_NAME.fullmatch(name) or (legacy is not None and legacy(rel)):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, name))
                    n += 1
    return n


def lock(folder: str, busy: str, name: str = ".lock"):
    """An exclusive flock on folder/`name`, held while the returned file stays open (freed when the process ends,
    even by kill -9); UserError(`busy`) when another process holds it."""
    f = open(os.path.join(folder, name), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(busy) from None
    return f


def main(argv=None):
    parser = ArgumentParser(description="Show what the project's image reader makes of image files.")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.images:
        try:
            rgb = read_rgb(path)  # first: it refuses decompression bombs in one sentence
            with Image.open(path) as im:
                mode = im.mode
            print(f"{display_name(path)}: {mode} -> RGB {hxw(rgb.height, rgb.width)} (H x W)")
        except (ImageError, OSError) as exc:
            failed += 1
            print(f"error: {display_name(str(exc))}", file=sys.stderr)
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    main()
