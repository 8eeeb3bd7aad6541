"""Images: truncation to 8 bits like the reference, PNG bytes, previews."""

import pytest
import torch
from images_helper import read_png

from pid_core.images import preview_uint8, save_png, to_uint8


def test_to_uint8_truncates_like_the_reference():
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, -0.2, 0.999]).view(3, 1, 2)  # channels of two pixels
    assert to_uint8(x).tolist() == [[[0, 255, 0], [127, 255, 254]]]  # [H, W, 3]: clamped, then truncated


def test_png_round_trip(tmp_path):
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    save_png(image, str(tmp_path / "a.png"))
    assert (read_png(tmp_path / "a.png") == to_uint8(image)).all()


def test_preview():
    x0 = torch.linspace(-1, 1, 2 * 3 * 40 * 100).reshape(2, 3, 40, 100)
    img = preview_uint8(x0, max_side=50)
    assert img.shape == (20, 50, 3) and img.dtype.name == "uint8"
    assert preview_uint8(x0[:, :, :8, :8]).shape == (8, 8, 3)


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(b"the good file")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(OSError):
        save_png(torch.rand(3, 4, 4), str(path))
    monkeypatch.undo()
    assert path.read_bytes() == b"the good file"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left behind
