"""Command-line plumbing every script shares (not a part of the paper).

* ONE error contract: every bad input raises a `UserError` (or a subclass) whose message is one sentence;
  `main_guard` wraps each CLI's main and turns it into one `error:` line and exit status 2, and Ctrl-C or
  SIGTERM into one line and exit status 130 -- never a traceback;
* the flags and checks every CLI shares: `add_backbone_args`, `add_threads_arg`, `resolve_device`, `parse_size`
  (and `hxw`, how every size is printed: H x W), `check_numbers`, and `flag` / `add_flags` /
  `check_flag_numbers`, which make a dataclass of settings the CLI's flags, said once;
* the torchrun helpers: `rank_world`, `is_main`, `barrier`, `log` (a single process is rank 0 of 1);
* the forward passes' precision and timing: `PRECISIONS`, `autocast`, `synchronize`, `timed` (student.py re-exports
  them); `patch_budget`, the NaFlex backbone's --naflex-patches;
* `printable` / `display_name`: text with undecodable file-name bytes made printable; `note_random_weights`, the
  line every CLI prints above results on random weights.

This file imports nothing from the project: every other file may import it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `python files.py --help` answers at once
    import torch


class UserError(ValueError):
    """Bad input or environment. The message is one sentence: what happened and what to do."""


class DeviceError(UserError):
    """A --device that does not exist here."""


# ----------------------------------------------------------------------------------------------------------------
# The error contract
# ----------------------------------------------------------------------------------------------------------------


SIGNAL_GRACE_S = 2.0  # a second Ctrl-C / SIGTERM this soon after the first lets the first one's saving finish
_signals: list[float] = []  # when this process received Ctrl-C or SIGTERM (under main_guard)


def _terminate(signum, frame):
    """Ctrl-C and SIGTERM unwind as a KeyboardInterrupt: temp files removed, finished work kept.  A second one in
    quick succession does not interrupt the saving of the first (the exit status is 130 all the same)."""
    now = time.monotonic()
    quick = bool(_signals) and now - _signals[-1] < SIGNAL_GRACE_S
    _signals.append(now)
    if not quick:
        raise KeyboardInterrupt


def main_guard(main, argv=None, interrupted: str = "interrupted."):
    """Run `main(argv)` under the error contract and return its result.

    UserError -> `error: <message>` on stderr, exit 2.  KeyboardInterrupt (Ctrl-C, or SIGTERM, which is turned
    into one) -> its own message if it carries one, else `interrupted`, on stderr, exit 130 -- also when a
    signal was received and the work ended anyway (never exit 0 after Ctrl-C).  A closed stdout pipe (`| head`)
    -> exit 141, silent.
    """
    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) != signal.SIG_IGN:  # e.g. `nohup`: an ignored signal stays ignored
                old[sig] = signal.signal(sig, _terminate)
    except ValueError:  # not the main thread (e.g. a notebook worker)
        pass
    _signals.clear()
    try:
        result = main(argv)
        sys.stdout.flush()  # a closed pipe fails here, inside the guard, not at the interpreter's exit
    except UserError as exc:
        print(printable(f"error: {exc}"), file=sys.stderr)
        stdout_closed()  # what was printed before the error cannot fail at exit either
        raise SystemExit(2 if not _signals else 130) from None
    except KeyboardInterrupt as exc:
        print(printable(str(exc.args[0]) if exc.args else interrupted), file=sys.stderr)
        stdout_closed()
        raise SystemExit(130) from None
    except BrokenPipeError:
        if not stdout_closed():
            raise  # another pipe (a subprocess's): an error of its own
        raise SystemExit(141) from None  # stdout's reader went away (`| head`): quietly, as Unix tools do
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if _signals:
        print(printable(interrupted), file=sys.stderr)
        raise SystemExit(130)
    return result


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader went away (`| head`); if so, stdout is pointed at /dev/null, so that
    flushing what is left (at the interpreter's exit) cannot fail again.  False where it cannot be told."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poll.poll(0))
        if gone:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return gone
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor (a notebook, pytest)
        return False


def printable(text: str) -> str:
    """`text` with undecodable file-name bytes shown as \\xNN escapes: any stream can print it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def display_name(path: str | os.PathLike) -> str:
    """A file name that can always be printed or drawn: undecodable bytes (a non-UTF-8 name) become U+FFFD."""
    name = os.fsdecode(path)
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class ArgumentParser(argparse.ArgumentParser):
    """argparse under the error contract: a bad command line is one `error:` line and exit status 2 (the usage is
    what --help prints).  A --threads flag added by `add_threads_arg` is applied as it is parsed (`apply_threads`)."""

    threads_flag = False  # set by add_threads_arg
    naflex_flag = False  # set where --naflex-patches is the --backbone's budget (add_backbone_args, bench.py)

    def error(self, message):
        print(printable(f"error: {message} (see {self.prog} --help)"), file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self.threads_flag:
            apply_threads(namespace.threads)
        if self.naflex_flag:
            note_unused_budget(namespace.backbone, namespace.naflex_patches)
        return namespace, extras


_noted = set()


def note_unused_budget(backbone: str | None, budget):
    """A --naflex-patches given with a backbone that has no patch budget is said once (on stderr), not ignored
    silently."""
    if backbone and budget != 256 and not backbone.endswith("naflex-b16") and (backbone, budget) not in _noted:
        _noted.add((backbone, budget))
        print(f"note: --naflex-patches applies to siglip2-naflex-b16 only; {backbone} ignores it.", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Shared flags and checks
# ----------------------------------------------------------------------------------------------------------------


def add_backbone_args(parser: argparse.ArgumentParser, names, default: str = "tiny", naflex: bool = False):
    """The --backbone / --pretrained / --device / --threads flags shared by every CLI (`names`: the known
    backbones); with `naflex`, also --naflex-patches (the CLI then sets `backbone.max_patches`, which only
    `NaFlexBackbone` reads)."""
    import torch

    parser.add_argument("--backbone", default=default, help=f"one of {', '.join(names)} (default: {default})")
    parser.add_argument(
        "--pretrained",
        default="default",
        help="'default' (download through open_clip, cached), 'none' (random weights, offline), "
        "or a local open_clip weights file (dinov3-l16: BACKBONE.pth,DINOTXT.pth; docs/backbones.md)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs: cpu, cuda or cuda:N (default: %(default)s; cuda when a GPU is there)",
    )
    add_threads_arg(parser)
    if not naflex:
        return
    parser.naflex_flag = True
    parser.add_argument(
        "--naflex-patches",
        default="256",
        type=patch_budget,
        metavar="N|all",
        help="siglip2-naflex-b16 only: the patch budget each image is resized to, aspect ratio kept (default: "
        "%(default)s, the reference preprocessing; 'all': the image's own grid, no resize)",
    )


WINDOW_HELP = (
    "the teacher's window K in px, a multiple of the patch size (default: the backbone's native K); at another K "
    "than the native one each window runs with its position embeddings resized to the K/p grid, (E3)"
)


def add_teacher_args(parser: argparse.ArgumentParser):
    """The sliding-window teacher's --stride, --window, --batch-size and --precision flags (teacher.py's CLI;
    figures.py uses the same window help)."""
    parser.add_argument("--stride", type=int, default=24, help="window stride s in pixels, 1..K (paper: 24)")
    parser.add_argument("--window", type=int, default=None, metavar="K", help=WINDOW_HELP)
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: auto)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16/fp16 autocast on GPU, fp32 on CPU (default: %(default)s)",
    )


def check_window_fits(window: int | None, H: int, W: int, what: str = "--window"):
    """A teacher window larger than the H x W image on both sides sees only its zero padding around the image."""
    if window is not None and window > max(H, W):
        raise UserError(
            f"{what} {window} is larger than the {H}x{W} px image; give a window of at most {max(H, W)} px "
            f"(or leave --window out for the backbone's native K)."
        )


def thread_count(text: str) -> int:
    """--threads (an argparse type): a whole number of threads, at least 1."""
    if not str(text).strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--threads must be a whole number at least 1, got '{printable(str(text))}'")
    return int(text)


def add_threads_arg(parser: argparse.ArgumentParser):
    """--threads N, every CLI's: torch's intra-op CPU threads (`apply_threads`, done by `ArgumentParser` as it
    parses).  On a machine shared with other jobs (2 cores, busy), 1 thread can be several times faster."""
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        metavar="N",
        help="CPU threads for torch, also for the scripts this one runs (default: torch's, one per core); on a "
        "shared machine with few cores, 1 can be several times faster",
    )
    parser.threads_flag = True


def apply_threads(threads: int | None):
    """torch's intra-op threads, and OMP_NUM_THREADS for the processes this one starts; None: leave them."""
    import torch

    if threads is None:
        return
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


RANDOM_WEIGHTS = "random weights (--pretrained none, or --backbone tiny without a --pretrained file)"


def note_random_weights(random: bool):
    """Every CLI's one line above results computed with random weights (`Backbone.random_weights`), rank 0 only."""
    if random and is_main():
        print(f"note: {RANDOM_WEIGHTS}: the numbers below say nothing about the method.", flush=True)


def hxw(H: int, W: int) -> str:
    """The one way a size is printed: height x width, as --size HxW is given ('512x1024': 512 high, 1024 wide)."""
    return f"{H}x{W}"


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' (or 'mps') -> torch.device, checked to exist here; DeviceError otherwise."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device '{name}'; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was asked for but no CUDA GPU is available here; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPU(s) here.")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {name} was asked for but MPS is not available here; use --device cpu.")
    elif device.type != "cpu":
        raise DeviceError(f"device '{name}' is not supported; use cpu, cuda or cuda:N.")
    return device


def parse_size(text: str, what: str = "size") -> tuple[int, int]:
    """'HxW' -> (H, W), both positive; UserError with one sentence otherwise."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"{what} must be HxW with two positive integers, e.g. 512x1024; got '{text}'.")
    H, W = (int(p) for p in parts)
    if H < 1 or W < 1:
        raise UserError(f"{what} must be at least 1x1, got '{text}'.")
    return H, W


def check_unit_images(images, what: str):
    """Images where [0, 1] RGB is documented (`Backbone.normalize`, `segment()`): a uint8 tensor, 0..255 floats or
    non-finite values are one sentence (a resize's bicubic overshoot, up to 0.25 beyond the range, is allowed)."""
    import torch

    if not torch.is_tensor(images) or not images.is_floating_point():
        kind = images.dtype if torch.is_tensor(images) else type(images).__name__
        raise UserError(f"{what} takes float RGB images in [0, 1], not {kind}; pass images.float() / 255 for 8-bit.")
    if images.numel():
        lo, hi = torch.stack(torch.aminmax(images.detach().float())).tolist()  # one device -> host copy
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -0.25 or hi > 1.25:
            raise UserError(
                f"{what} takes RGB images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; divide 0..255 images by 255."
            )


def prompt_list(texts) -> list[str]:
    """`encode_text`'s prompts: a list (or tuple) of str; one str is ONE prompt (as open_clip's tokenizer takes it),
    never split into its characters; anything else is one sentence."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"encode_text takes a list of str (or one str), not {type(texts).__name__} {texts!r:.60}.")
    return list(texts)


def free_memory(device) -> int | None:
    """Bytes this process could still allocate on `device`: free GPU memory, or MemAvailable on the host; None when
    unknown (e.g. MPS)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None


def check_memory(H: int, W: int, patch: int, dim: int, device, what: str, batch: int = 1):
    """Refuse, with the estimate, a single pass over `batch` H x W images that cannot fit `device` (a 100000^2
    --size asked 120 GB for its input alone).  A lower bound: the fp32 input and ~12 (tokens x C) fp32 activations
    per image (the residual, q/k/v, the 4x MLP), no attention matrix; so only hopeless sizes are refused."""
    tokens = math.ceil(H / patch) * math.ceil(W / patch)
    check_bytes(batch * 4 * (3 * H * W + 12 * tokens * dim), device, f"{what} {H}x{W} px", "input and activations")


def check_bytes(need: int, device, what: str, of: str):
    """Refuse, with the estimate, work that needs `need` bytes (`of`: of what) when `device` has less free."""
    free = free_memory(device)
    if free is not None and need > free:
        raise UserError(
            f"{what} needs at least {need / 2**30:.1f} GiB on {device} ({of}), but {free / 2**30:.1f} GiB is free; "
            f"use a smaller size."
        )


def check_numbers(rules, error=UserError):
    """One table of number checks, one sentence each.  `rules`: (flag, value, rule) with rule one of
    ('>=', least) -- an integer count or size at least `least`; 'finite>0'; 'finite>=0'; '0..1'.
    A value of None (a flag left at its automatic default) passes."""
    for flag, value, rule in rules:
        if value is None:
            continue
        if isinstance(rule, tuple):
            if value < rule[1]:
                raise error(f"{flag} must be at least {rule[1]}, not {value}.")
        elif rule in ("finite>0", "finite>=0"):
            ok = math.isfinite(value) and (value > 0 or (rule == "finite>=0" and value == 0))
            if not ok:
                raise error(f"{flag} must be a finite number {'> 0' if rule == 'finite>0' else '>= 0'}, not {value}.")
        elif rule == "0..1":
            if not 0 <= value <= 1:
                raise error(f"{flag} must be between 0 and 1, got {value}.")
        else:
            raise AssertionError(f"unknown rule {rule!r}")


def flag(default, help: str, check=None, **argparse_options):
    """A dataclass field that is also a command-line flag: its default, its --help and its number check (a
    `check_numbers` rule), said once."""
    return field(default=default, metadata=dict(help=help, check=check, **argparse_options))


def add_flags(parser, flags, skip=(), **defaults):
    """One --flag-name per field of the dataclass `flags` but `skip` (bool: a switch; int / float / str: typed), with
    this CLI's `defaults` (else the field's); a default other than None is shown when the help does not say it."""
    for f in fields(flags):
        if f.name in skip:
            continue
        options = {k: v for k, v in f.metadata.items() if k != "check"}
        kind = f.type.split(" |")[0]  # "int | None" -> int
        if kind == "bool":
            options.update(action="store_true")
        else:
            options.update(type={"int": int, "float": float}.get(kind, str), default=defaults.get(f.name, f.default))
            if options["default"] is not None and "default" not in options["help"]:
                options["help"] += " (default: %(default)s)"
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def check_flag_numbers(args, flags, skip=()):
    """The number checks of the fields of `flags` (`flag(check=...)`), one sentence each, before any work."""
    checked = [f for f in fields(flags) if f.metadata.get("check") and f.name not in skip]
    check_numbers([("--" + f.name.replace("_", "-"), getattr(args, f.name), f.metadata["check"]) for f in checked])


# ----------------------------------------------------------------------------------------------------------------
# torchrun helpers
# ----------------------------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed

    return torch.distributed


def rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) in a single process."""
    return (_dist().get_rank(), _dist().get_world_size()) if _dist().is_initialized() else (0, 1)


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier():
    if _dist().is_initialized():
        _dist().barrier()


def log(msg: str):
    """One line to stderr that does not break the tqdm bars; prefixed with the rank under torchrun."""
    from tqdm import tqdm

    prefix = f"[rank {_dist().get_rank()}] " if _dist().is_initialized() else ""
    tqdm.write(printable(f"{prefix}{msg}"), file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Precision and timing of the forward passes (student.py re-exports them)
# ----------------------------------------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def autocast(device: torch.device | str, precision: str = "auto"):
    """The mixed-precision context every CLI runs its forward passes in.

    precision "auto": bf16 autocast on GPUs that support it, fp16 on other GPUs; "fp32": no autocast (the authors
    evaluate in fp32); "fp16" / "bf16": autocast to that dtype on CUDA (the authors train and make teacher targets
    in fp16).  On CPU every precision is a no-op (fp32): CPU half-precision autocast is slow on most CPUs and would
    make the CPU tests inexact, so it buys nothing here.
    """
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    device = torch.device(device)
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def synchronize(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: bool = True):
    """(fn(), its wall time in seconds): after one untimed warm-up call, synchronised around the timed call on CUDA."""
    if warmup:
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def patch_budget(text: str) -> int | None:
    """--naflex-patches (an argparse type): a positive number of patches, or 'all' (None)."""
    if str(text).strip().lower() == "all":
        return None
    if not str(text).strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive number of patches or 'all', got '{printable(str(text))}'")
    return int(text)
