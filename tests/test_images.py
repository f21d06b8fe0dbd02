"""Opening user images: every awkward file is made here, in the test."""
import os

import numpy as np
import pytest
from PIL import Image

from trainers.data.images import IMAGE_EXTENSIONS, ImageError, check_image, list_images, open_rgb

RED = (255, 0, 0)


def _close(pixel, expected, tol=12):
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


def test_exif_rotation_is_applied(tmp_path):
    # Stored 40x20 with a red top-left corner; orientation 6 = "rotate 90 degrees clockwise to view".
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif)

    img = open_rgb(path)
    assert img.mode == "RGB" and img.size == (20, 40)
    assert _close(img.getpixel((16, 3)), RED), "red corner should move to the top-right"
    assert _close(img.getpixel((3, 3)), (0, 0, 255))


def test_grayscale_becomes_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (8, 8), 100).save(path)
    img = open_rgb(path)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (100, 100, 100)


def test_transparency_composited_on_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, :4, 3] = 255  # left half opaque red, right half fully transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "logo.png")
    img = open_rgb(tmp_path / "logo.png")
    assert img.getpixel((1, 1)) == RED
    assert img.getpixel((6, 1)) == (255, 255, 255)

    la = Image.new("LA", (4, 4), (0, 0))  # transparent black grey+alpha
    la.save(tmp_path / "la.png")
    assert open_rgb(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("RGB", (8, 8), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "pal.png")
    assert _close(open_rgb(tmp_path / "pal.png").getpixel((2, 2)), (0, 128, 0), tol=2)

    trans = Image.new("P", (8, 8), 1)
    trans.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    trans.putpixel((0, 0), 0)
    trans.save(tmp_path / "trans.png", transparency=0)
    img = open_rgb(tmp_path / "trans.png")
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent index -> white, not black
    assert img.getpixel((4, 4)) == (0, 0, 255)

    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in (RED, (0, 0, 255))]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    assert _close(open_rgb(gif).getpixel((4, 4)), RED, tol=2), "GIF gives its first frame"


@pytest.mark.parametrize("dtype,ext", [(np.uint16, "png"), (np.uint16, "tif"), (">u2", "tif")])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, dtype, ext):
    arr = np.full((8, 8), 32768, dtype=dtype)
    arr[0, 0] = 65535
    arr[0, 1] = 0
    path = tmp_path / f"scan16.{ext}"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I;16")  # the case Pillow's convert() clips to white
    img = open_rgb(path)
    assert abs(img.getpixel((4, 4))[0] - 128) <= 1
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (0, 0, 0)


def test_32bit_int_grey_holding_16bit_data(tmp_path):
    path = tmp_path / "int32.tif"
    Image.fromarray(np.full((4, 4), 32768, np.int32)).save(path)
    assert Image.open(path).mode == "I"
    assert abs(open_rgb(path).getpixel((0, 0))[0] - 128) <= 1


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # pure red ink
    assert Image.open(path).mode == "CMYK"
    img = open_rgb(path)
    assert img.mode == "RGB" and _close(img.getpixel((8, 8)), RED)


def _truncated_jpeg(path):
    noise = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    full = path.with_suffix(".full")
    Image.fromarray(noise).save(full, format="JPEG", quality=90)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    full.unlink()
    return path


def test_bad_files_raise_image_error_naming_them(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    truncated = _truncated_jpeg(tmp_path / "cut.jpg")

    for path, words in ((empty, "empty"), (text, "not an image"), (truncated, "damaged")):
        with pytest.raises(ImageError) as err:
            open_rgb(path)
        assert str(path) in str(err.value) and words in str(err.value)
        with pytest.raises(ImageError):
            check_image(path)
        assert isinstance(err.value, ValueError)
    with pytest.raises(ImageError, match="cannot read"):
        open_rgb(tmp_path / "missing.png")


def test_returned_image_is_detached_from_the_file(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4), RED).save(path)
    img = open_rgb(path)
    os.remove(path)  # the file is closed: removal works everywhere and the pixels stay
    assert img.getpixel((0, 0)) == RED


def test_list_images_sorted_filtered_and_reported(tmp_path):
    for name in ("b.png", "a.JPG", "ñandú 猫.webp", "c.bmp"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP",
                                                                "bmp": "BMP"}[name.rsplit(".", 1)[1].lower()])
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "._b.png").write_bytes(b"mac resource fork")
    (tmp_path / "readme.md").write_text("hi")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "deep.png")
    _truncated_jpeg(tmp_path / "d.jpg")

    paths, skipped = list_images(tmp_path)
    names = [os.path.basename(p) for p in paths]
    assert names == ["a.JPG", "b.png", "c.bmp", "d.jpg", "ñandú 猫.webp"]
    assert [os.path.basename(p) for p, _ in skipped] == ["readme.md"]
    assert ".md" in skipped[0][1]

    checked, skipped = list_images(tmp_path, check=True)
    assert "d.jpg" not in [os.path.basename(p) for p in checked]
    assert any(os.path.basename(p) == "d.jpg" and "damaged" in r for p, r in skipped)
    assert list_images(tmp_path) == list_images(tmp_path)  # deterministic


def test_extensions_cover_the_common_formats():
    for ext in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"):
        assert "." + ext in IMAGE_EXTENSIONS
