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
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]               # no temp file left behind
