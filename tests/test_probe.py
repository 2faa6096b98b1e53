"""The probe on single files: recognised by content, bombs refused without allocating, odd
modes and EXIF orientation, decode vs header validation, resize."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest
from PIL import Image
from zoo import exif_rotated_jpeg, image_bytes, jpeg_bomb, jpeg_bytes, png_bomb

from packer.digest import content_digest
from packer.probe import probe_bytes, probe_file
from packer.transform import ResizeSpec, parse_resize


def test_recognised_by_content_not_name(tmp_path):
    png = image_bytes(Image.new("RGB", (5, 3), "blue"), "PNG")
    (tmp_path / "photo.dat").write_bytes(png)
    probe = probe_file(str(tmp_path / "photo.dat"))
    assert (probe.ok, probe.ext, probe.width, probe.height, probe.size) == (True, "png", 5, 3, len(png))
    assert probe.digest == probe.source_digest == content_digest(png)


@pytest.mark.parametrize("data, is_image, words", [
    (b"", False, "empty"),  # no content says image: the name decides (skipped or ignored)
    (b"hello world\n" * 10, False, "not an image"),
    (png_bomb(50_000, 50_000), True, "decompression bomb"),
    (jpeg_bomb(50_000, 50_000), True, "decompression bomb"),
    (png_bomb(10_000, 10_000), True, "decompression bomb"),
])
def test_refused(data, is_image, words):
    probe = probe_bytes(data)
    assert not probe.ok and probe.is_image == is_image and words in probe.reason


def test_bombs_refused_without_allocating():
    """A 50000x50000 RGB image is 7.5 GB of pixels; probing must stay tiny (checked in a fresh
    process, by its peak resident memory)."""
    script = textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, "tests")
        from zoo import png_bomb, jpeg_bomb
        from packer.probe import probe_bytes
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for data in (png_bomb(50_000, 50_000), jpeg_bomb(50_000, 50_000), png_bomb(12_000, 12_000)):
            assert not probe_bytes(data).ok
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(done.stdout) < 50_000  # KiB


def test_max_pixels_is_the_limit():
    big = png_bomb(20_000, 20_000)  # 400 Mpx: beyond even Pillow's own hard limit
    assert "--max-pixels" in probe_bytes(big).reason
    probe = probe_bytes(big, validate="header", max_pixels=500_000_000)
    assert probe.ok and (probe.width, probe.height) == (20_000, 20_000)
    assert not probe_bytes(image_bytes(Image.new("L", (10, 10)), "PNG"), max_pixels=99).ok
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global limit restored


def test_a_bomb_gets_one_message_on_every_probe_path():
    """With --resize (or --validate decode/header) Pillow refused a bomb over twice its limit
    in its own words ("could be decompression bomb DOS attack", the limit doubled)."""
    from packer.transform import ResizeSpec

    for data in (png_bomb(50_000, 50_000), jpeg_bomb(50_000, 50_000)):
        expected = probe_bytes(data).reason
        assert expected.startswith("decompression bomb refused: 50000x50000 = 2,500,000,000 pixels")
        for options in ({"resize": ResizeSpec(40)}, {"validate": "decode"}, {"validate": "header"}):
            assert probe_bytes(data, **options).reason == expected, options


def test_truncated_caught_by_decode_only():
    im = Image.effect_noise((160, 120), 60).convert("RGB")
    data = jpeg_bytes(im, quality=90)
    cut = data[: len(data) // 2]
    assert probe_bytes(cut, validate="header").ok
    probe = probe_bytes(cut)
    assert not probe.ok and probe.is_image and "truncated JPEG" in probe.reason


def test_exif_orientation_gives_oriented_size():
    probe = probe_bytes(exif_rotated_jpeg(40, 20, orientation=6))
    assert (probe.width, probe.height) == (20, 40)
    assert (probe_bytes(exif_rotated_jpeg(40, 20, orientation=3)).width) == 40


@pytest.mark.parametrize("mode, fmt, ext", [
    ("CMYK", "JPEG", "jpg"), ("I;16", "PNG", "jpg"), ("RGBA", "PNG", "png"), ("LA", "PNG", "png"),
    ("P", "GIF", "jpg"), ("1", "BMP", "jpg"), ("RGB", "WEBP", "jpg"), ("RGB", "TIFF", "jpg"),
])
def test_resize_odd_modes(mode, fmt, ext):
    data = image_bytes(Image.new(mode, (80, 40)), fmt)
    probe = probe_bytes(data, resize=ResizeSpec(20))
    assert probe.ok and probe.ext == ext and (probe.width, probe.height) == (40, 20)
    assert probe.digest != probe.source_digest == content_digest(data)


def test_resize_never_enlarges_and_keeps_exif_upright():
    probe = probe_bytes(exif_rotated_jpeg(40, 20), resize=ResizeSpec(256))
    assert (probe.width, probe.height) == (20, 40)


def test_parse_resize():
    assert parse_resize(None) is None and parse_resize("none") is None and parse_resize("") is None
    assert parse_resize("256") == ResizeSpec(256, 90)
    assert parse_resize("short:128px", quality=80) == ResizeSpec(128, 80)
    assert parse_resize("224x160", quality=75) == ResizeSpec(quality=75, size=(224, 160))
    assert parse_resize("224X224px").as_dict() == {"width": 224, "height": 224, "quality": 90}
    assert ResizeSpec(256).as_dict() == {"short_side": 256, "quality": 90}  # as before
    for bad in ("big", "-3", "0", 0, "224x", "0x5", "1x2x3", "x"):
        with pytest.raises(ValueError, match="--resize"):
            parse_resize(bad)
    with pytest.raises(ValueError, match="quality"):
        parse_resize(64, quality=0)
    with pytest.raises(ValueError):
        ResizeSpec(256, size=(224, 224))


def _halves_jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    """Red left half, blue right half (as stored, before any EXIF turn)."""
    im = Image.new("RGB", (width, height), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, width // 2, height))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    return jpeg_bytes(im, quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("raw, orientation, left", [
    ((400, 300), None, "red"), ((40, 10), None, "red"),  # shrunk; enlarged
    ((400, 300), 6, "top"),  # turned upright first: the red half ends on top
])
def test_exact_resize_stores_every_image_at_the_size_upright(raw, orientation, left):
    """``--resize 48x32`` squashes every image to exactly 48x32, like Keras' default
    image_size, after turning it upright, so the reader never resizes."""
    import io

    import numpy as np

    probe = probe_bytes(_halves_jpeg(*raw, orientation), resize=ResizeSpec(size=(48, 32)))
    assert probe.ok and probe.ext == "jpg" and (probe.width, probe.height) == (48, 32)
    kept: list[bytes] = []
    probe_bytes(_halves_jpeg(*raw, orientation), resize=ResizeSpec(size=(48, 32)), keep_stored=kept)
    px = np.asarray(Image.open(io.BytesIO(kept[0])).convert("RGB"), dtype=np.int16)
    assert px.shape == (32, 48, 3)
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    first, second = (px[:, :20], px[:, 28:]) if left == "red" else (px[:12], px[20:])
    assert np.abs(first - red).mean() < 12 and np.abs(second - blue).mean() < 12


def test_unreadable_file_is_skipped_not_crashed(tmp_path):
    probe = probe_file(str(tmp_path / "gone.jpg"))
    assert not probe.ok and probe.is_image and "cannot read" in probe.reason


@pytest.mark.parametrize("keep", [10, 20, 60])
def test_image_cut_inside_its_headers_is_a_broken_image_not_junk(keep):
    """A JPEG/PNG cut before Pillow can identify it is still an image by its signature, so
    a file named photo.dat is skipped with a reason rather than ignored as not an image."""
    for data, kind in ((jpeg_bytes(Image.new("RGB", (64, 48), "red")), "JPEG"),
                       (image_bytes(Image.new("RGB", (64, 48), "red"), "PNG"), "PNG")):
        probe = probe_bytes(data[:keep])
        assert not probe.ok and probe.is_image, (kind, keep, probe)


@pytest.mark.parametrize("spec, stored, decoded_below", [
    (ResizeSpec(256), (341, 256), (2048, 1536)),
    (ResizeSpec(size=(224, 224)), (224, 224), (2048, 1536)),  # exact size: squashed
])
def test_resize_of_a_large_jpeg_decodes_reduced_and_matches_a_full_decode(spec, stored, decoded_below):
    """--resize lets libjpeg shrink a large JPEG by DCT scaling first (Pillow's thumbnail
    rule: keep twice the target); the stored image has the same size as a full-size resize
    and nearly the same pixels."""
    import io

    import numpy as np

    from packer.examples import photo, random_crop
    from packer.transform import load_for_resize, transform_image

    big = random_crop(random.Random(0), photo("astronaut"), 512).resize((2048, 1536))
    data = jpeg_bytes(big, quality=92)
    im = Image.open(io.BytesIO(data))
    load_for_resize(im, spec)
    assert im.size[0] < decoded_below[0]  # decoded at a reduced scale
    assert min(im.size) >= 2 * min(stored)  # still twice the target
    fast, _, w, h = transform_image(im, spec)
    full_im = Image.open(io.BytesIO(data))
    full_im.load()
    full, _, fw, fh = transform_image(full_im, spec)
    assert (w, h) == (fw, fh) == stored
    a = np.asarray(Image.open(io.BytesIO(fast)), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(full)), dtype=np.int16)
    assert np.abs(a - b).mean() < 2.0


def test_reads_whole_files_when_one_read_is_not_enough():
    """Source reads are sized by fstat; a read that comes back short (a pipe here, a file
    over 2 GiB or a network filesystem in practice) is completed, and a file that reports
    0 bytes is read to its end (proc-like and some FUSE files report no size)."""
    import os
    import threading
    import time

    from packer.probe import _read_all

    r, w = os.pipe()
    os.write(w, b"a" * 50)

    def later():
        time.sleep(0.05)
        os.write(w, b"b" * 70)
        os.close(w)

    thread = threading.Thread(target=later)
    thread.start()
    assert bytes(_read_all(r, 120)) == b"a" * 50 + b"b" * 70  # second part waited for
    thread.join()
    os.close(r)

    r, w = os.pipe()
    os.write(w, b"short")
    os.close(w)
    assert bytes(_read_all(r, 100)) == b"short"  # shrank meanwhile: what is there
    os.close(r)

    r, w = os.pipe()
    os.write(w, b"no size" * 1000)
    os.close(w)
    assert _read_all(r, 0) == b"no size" * 1000
    os.close(r)


def _noisy_png(**save) -> bytes:
    import io

    import numpy as np

    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["decode", "resize"])
def test_a_png_with_damaged_pixel_data_is_refused_when_decoding(mode):
    """Zeroed bytes inside the IDAT stream: Pillow's load fails. Reading the orientation
    first (getexif loads a PNG and swallows the error) let it through, and --resize stored
    the half-decoded pixels as a valid JPEG."""
    good = _noisy_png()
    bad = good[:200] + bytes(64) + good[264:]
    options = {"validate": "decode"} if mode == "decode" else {"resize": ResizeSpec(32)}
    assert probe_bytes(good, **options).ok
    probe = probe_bytes(bad, **options)
    assert not probe.ok and probe.is_image and "corrupt PNG" in probe.reason


@pytest.mark.parametrize("validate", ["structure", "decode", "header"])
def test_width_and_height_are_upright_for_an_exif_rotated_tiff(validate):
    """TIFF's plugin reports the upright size itself (Pillow >= 11): it must not be swapped
    a second time (the .json member's width/height are after EXIF orientation)."""
    import io

    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (60, 40), "red").save(buf, format="TIFF", exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        upright = ImageOps.exif_transpose(im).size
    assert upright == (40, 60)
    probe = probe_bytes(buf.getvalue(), validate=validate)
    assert probe.ok and (probe.width, probe.height) == upright


def _photo_jpeg(size: tuple[int, int], orientation: int = 1, **save) -> bytes:
    """A photo crop at ``size`` (as stored), with an EXIF orientation, as a q95 JPEG."""
    from packer.examples import photo, random_crop

    im = random_crop(random.Random(sum(size)), photo("astronaut"), 512).resize(size)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(im, quality=95, exif=exif.tobytes(), **save)


@pytest.mark.parametrize("raw", [(903, 918), (1801, 1203), (2001, 1339)])
@pytest.mark.parametrize("orientation", [1, 2, 3, 5, 6, 8])
@pytest.mark.parametrize("spec", [ResizeSpec(224, quality=100), ResizeSpec(size=(224, 160), quality=100)],
                         ids=["short-side", "exact"])
def test_a_reduced_decode_of_an_odd_sized_jpeg_keeps_the_full_size_and_picture(raw, orientation, spec):
    """libjpeg rounds a reduced decode's size up (1,801 columns at 1/2: 901, holding 900.5
    of picture): the stored size comes from the full image and the resize takes the
    picture's box, as Pillow's thumbnail does, turned upright with the image. From the
    rounded size, a sixth of large JPEGs were stored a pixel off, and every one with an odd
    side stretched by the part-pixel."""
    import io

    import numpy as np

    from packer.transform import transform_image

    data = _photo_jpeg(raw, orientation)
    kept: list[bytes] = []
    probe = probe_bytes(data, resize=spec, keep_stored=kept)
    full = Image.open(io.BytesIO(data))
    full.load()  # decoded at full size: the reference
    reference, _, width, height = transform_image(full, spec)
    assert (probe.width, probe.height) == (width, height)
    stored = np.asarray(Image.open(io.BytesIO(kept[0])), dtype=np.int16)
    ref = np.asarray(Image.open(io.BytesIO(reference)), dtype=np.int16)
    assert stored.shape == ref.shape
    # the reduced decode alone: 0.44-0.58 here, as on even sides; stretched: 1.2-1.6
    assert np.abs(stored - ref).mean() < 0.8, np.abs(stored - ref).mean()


def test_upright_boxes_are_exif_transposes():
    """The box of a reduced decode, turned as ImageOps.exif_transpose turns the image."""
    import numpy as np
    from PIL import ImageOps

    from packer.transform import _UPRIGHT_BOX

    for orientation in range(1, 9):
        im = Image.new("L", (7, 5), 0)
        im.paste(255, (0, 0, 4, 3))  # the box (0, 0, 4, 3) of a 7x5 image
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.info["exif"] = exif.tobytes()
        upright = np.asarray(ImageOps.exif_transpose(im))
        ys, xs = np.nonzero(upright)
        assert _UPRIGHT_BOX[orientation](0, 0, 4, 3, 7, 5) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), orientation


@pytest.mark.parametrize("mode, key", [("L", 40), ("RGB", (40, 40, 40))])
def test_a_png_colour_key_is_kept_as_alpha_by_resize(mode, key):
    """A grey or RGB PNG with a tRNS colour key has alpha (readers and TensorFlow give it):
    stored as an opaque JPEG, its transparency was lost for color_mode="rgba"."""
    import io

    import numpy as np

    im = Image.new(mode, (60, 30), key)
    im.paste((200,) if mode == "L" else (200, 100, 50), (0, 0, 40, 30))
    kept: list[bytes] = []
    probe = probe_bytes(image_bytes(im, "PNG", transparency=key), resize=ResizeSpec(16), keep_stored=kept)
    assert probe.ok and probe.ext == "png"
    alpha = np.asarray(Image.open(io.BytesIO(kept[0])).convert("RGBA"))[:, :, 3]
    assert alpha[:, :8].min() == 255 and alpha[:, -3:].max() == 0  # the key's third: transparent


def test_a_small_mpo_jpeg_is_stored_as_it_came():
    """Cameras and phones write MPO (a JPEG with more pictures after it), which Pillow
    opens as MPO: one already at the size was re-encoded, where a JPEG is kept."""
    import io

    from packer.examples import photo

    first, second = photo("astronaut").resize((200, 133)), photo("coffee").resize((200, 133))
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second], quality=90)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    kept: list[bytes] = []
    probe = probe_bytes(data, resize=ResizeSpec(256), keep_stored=kept)
    assert probe.ok and probe.ext == "jpg" and kept == [data]


def test_a_side_beyond_jpegs_limit_is_stored_as_png():
    """JPEG cannot hold a side over 65,500 px: a 70,000 x 10 strip under --resize 256
    (kept at its size) was skipped as "cannot resize: broken data stream"."""
    kept: list[bytes] = []
    probe = probe_bytes(image_bytes(Image.new("RGB", (70_000, 10), "red"), "PNG"),
                        resize=ResizeSpec(256), keep_stored=kept)
    assert probe.ok and probe.ext == "png" and (probe.width, probe.height) == (70_000, 10)


@pytest.mark.parametrize("adobe", [True, False], ids=["adobe", "no-adobe-marker"])
def test_a_cmyk_jpeg_is_stored_as_readers_and_keras_see_it(adobe):
    """Pillow reads every CMYK JPEG as Adobe's inverted CMYK; one without Adobe's marker
    stores its ink as is, as TensorFlow (so Keras, and the reader) reads it. --resize
    stored such a file as a colour negative (mean 113/255 from Keras' pixels)."""
    import io

    import numpy as np

    from packer.examples import photo
    from packer.headers import _segments
    from reader.decode import DecodeOptions, decode_image

    data = jpeg_bytes(photo("coffee").resize((90, 60)).convert("CMYK"), quality=95)
    if not adobe:
        pos, length = next((p, n) for marker, p, n in _segments(data) if marker == 0xEE)
        data = data[:pos] + data[pos + 2 + length:]
    kept: list[bytes] = []
    probe = probe_bytes(data, resize=ResizeSpec(256), keep_stored=kept)
    assert probe.ok and probe.ext == "jpg"
    stored = np.asarray(Image.open(io.BytesIO(kept[0])).convert("RGB"), dtype=np.int16)
    keras_like = decode_image(data, DecodeOptions(image_size=(60, 90), dct_scaling=False)).astype(np.int16)
    assert np.abs(stored - keras_like).mean() < 10  # one re-encode apart (5 here), not a negative (~110)
    pillow = decode_image(data, DecodeOptions(image_size=(60, 90), decoder="pillow")).astype(np.int16)
    assert np.abs(pillow - keras_like).mean() < 2  # the reader's Pillow path reads it so too


def test_a_16_bit_png_colour_key_makes_the_matching_pixels_transparent():
    """The 8-bit image kept the 16-bit key (4660), which Pillow matched as its low byte (52):
    none of the key's pixels came out transparent, and every pixel of value 52 did."""
    import io

    import numpy as np

    values = np.full((16, 18), 4660, dtype=np.uint16)
    values[:, 12:] = 52 * 257 // 256 * 256  # 8-bit value 52 after the scale, not the key
    kept: list[bytes] = []
    probe = probe_bytes(image_bytes(Image.fromarray(values), "PNG", transparency=4660),
                        resize=ResizeSpec(64), keep_stored=kept)
    assert probe.ok and probe.ext == "png"
    alpha = np.asarray(Image.open(io.BytesIO(kept[0])).convert("RGBA"))[:, :, 3]
    assert (alpha[:, :12] == 0).all() and (alpha[:, 12:] == 255).all()
