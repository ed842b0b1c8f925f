"""files.py: image reading for every mode, and atomic writes that never leave half a file."""

import errno
import json

import numpy as np
import pytest
import torch
from PIL import Image

from files import ImageError, WriteError, atomic_write, load_image, read_rgb, write_json


def test_load_image_is_rgb_in_0_1_for_grey_16bit_and_rgba(tmp_path):
    Image.fromarray(np.full((6, 9), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    Image.new("RGBA", (9, 6), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (9, 6), 51).save(tmp_path / "grey.png")
    for name, value in [("g16.png", 1.0), ("clear.png", 1.0), ("grey.png", 0.2)]:
        x = load_image(str(tmp_path / name))
        assert x.shape == (1, 3, 6, 9) and x.dtype == torch.float32
        assert torch.allclose(x, torch.full_like(x, value), atol=1e-6), name


def test_load_image_max_side_keeps_the_ratio(tmp_path):
    Image.new("RGB", (400, 100)).save(tmp_path / "wide.png")
    assert load_image(str(tmp_path / "wide.png"), max_side=200).shape == (1, 3, 50, 200)


def test_unreadable_images_raise_one_sentence(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    for path in (tmp_path / "bad.jpg", tmp_path / "missing.png"):
        with pytest.raises(ImageError) as exc:
            read_rgb(str(path))
        assert str(exc.value).startswith(f"cannot read image '{path}'") and "\n" not in str(exc.value)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"a": 1})

    def fill_the_disk(f):
        f.write(b'{"a": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match="no space left"):
        atomic_write(path, fill_the_disk)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height RGB pixels, with almost no data: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [100_000, 10_000])  # above 2x PIL's limit (error) and between 1x and 2x (warning)
def test_decompression_bomb_header_is_one_sentence_in_read_rgb_and_main(tmp_path, capsys, side):
    import files

    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, side, side)
    with pytest.raises(ImageError, match="too large|safety limit"):
        read_rgb(str(bomb))
    Image.new("RGB", (4, 3)).save(tmp_path / "ok.png")
    with pytest.raises(SystemExit) as exc:
        files.main([str(tmp_path / "ok.png"), str(bomb)])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and "ok.png: RGB -> RGB 3x4 (H x W)" in out  # 4 wide, 3 high
    assert err.count("error:") == 1 and "bomb.png" in err and "Traceback" not in err


def test_resolve_device_and_parse_size_say_it_in_one_sentence():
    from cli import DeviceError, parse_size, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for name, message in (("bogus", "unknown device"), ("cuda:99", "GPU"), ("meta", "not supported")):
        if name == "cuda:99" and torch.cuda.device_count() > 99:
            continue
        with pytest.raises(DeviceError, match=message):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert parse_size(" 512X1024 ") == (512, 1024)
    for text in ("abc", "0x0", "12", "-5x4", "3x4x5", "1.5x2"):
        with pytest.raises(ValueError, match="--size"):
            parse_size(text, "--size")


def test_display_name_survives_non_utf8_bytes():
    import os

    from cli import display_name

    name = os.fsdecode(b"caf\xe9.png")
    assert display_name(name) == "caf\ufffd.png"
    assert display_name(name).encode("utf-8")  # printable, drawable
    assert display_name("plain/é.png") == "plain/é.png"


def test_check_writable_and_atomic_write_under_a_file(tmp_path):
    from files import check_writable

    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile" / "out.json", tmp_path):
        with pytest.raises(WriteError):
            check_writable(bad)
    with pytest.raises(WriteError, match="a file stands where a folder is needed"):
        write_json(tmp_path / "afile" / "sub" / "out.json", {})
    check_writable(tmp_path / "new" / "out.json")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []  # the probe is gone
