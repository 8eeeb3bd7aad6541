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


def test_new_files_get_the_usual_permissions_and_replaced_files_keep_theirs(tmp_path):
    import os
    import stat

    old_umask = os.umask(0o022)
    try:
        save_png(torch.rand(3, 4, 4), str(tmp_path / "new.png"))
        assert stat.S_IMODE(os.stat(tmp_path / "new.png").st_mode) == 0o644
        (tmp_path / "mine.png").write_bytes(b"old")
        os.chmod(tmp_path / "mine.png", 0o600)
        save_png(torch.rand(3, 4, 4), str(tmp_path / "mine.png"))
        assert stat.S_IMODE(os.stat(tmp_path / "mine.png").st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_output_paths_are_checked(tmp_path):
    from pid_core.errors import OutputError
    from pid_core.images import (
        check_image_size,
        check_output_path,
        image_format,
        numbered_path,
    )

    assert check_output_path(str(tmp_path / "new" / "deeper" / "x.png")) and not (tmp_path / "new").exists()
    assert numbered_path("a/b.png", 3) == "a/b_03.png"
    assert image_format("X.PNG") == ".png"
    (tmp_path / "in.safetensors").write_bytes(b"x")
    cases = {
        str(tmp_path): "is a folder",
        "": "empty",
        str(tmp_path / "x.tiff"): "extension '.tiff'",
        str(tmp_path / "in.safetensors" / "x.png"): "is a file, not a folder",
    }
    for path, cause in cases.items():
        with pytest.raises(OutputError, match=cause):
            check_output_path(path)
    (tmp_path / "in.png").write_bytes(b"x")
    with pytest.raises(OutputError, match="is the input"):
        check_output_path(str(tmp_path / "." / "in.png"), inputs=[str(tmp_path / "in.png")])
    (tmp_path / "link.png").symlink_to(tmp_path / "in.png")
    with pytest.raises(OutputError, match="is the input"):
        check_output_path(str(tmp_path / "link.png"), inputs=[str(tmp_path / "in.png")])
    check_image_size("x.png", 20000, 20000)
    try:
        import PIL  # noqa: F401
    except ImportError:
        return
    with pytest.raises(OutputError, match="too large for .webp"):
        check_image_size("x.webp", 16384, 16384)


def test_jpeg_and_webp_with_pillow(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from pid_core.images import save_image

    image = torch.rand(3, 8, 12, generator=torch.Generator().manual_seed(0))
    for ext, name in ((".jpg", "JPEG"), (".webp", "WEBP"), (".png", "PNG")):
        save_image(image, str(tmp_path / f"a{ext}"))
        with Image.open(tmp_path / f"a{ext}") as written:
            assert written.format == name and written.size == (12, 8)
