"""The fast paths give the reference path's pixels (within tolerance) and exactly its labels.

Fast paths: simplejpeg decoding at any libjpeg-turbo scale (reader.decode, decoder "auto")
against Pillow with ``draft`` (decoder "pillow"); chunked decoding straight into aligned
batch arrays (reader.batches) against decoding each sample alone; the tf.data adapter
against ShardReader.
"""

from __future__ import annotations

import dataclasses
import io
import random
import threading
import tracemalloc

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from packer.errors import SampleDecodeError
from packer.examples import photo, random_crop
from reader import ShardReader
from reader import decode as decode_module
from reader.decode import DecodeOptions, decode_image, jpeg_orientation

simplejpeg = pytest.importorskip("simplejpeg")

# simplejpeg may pick a finer DCT scale (n/8) than Pillow's draft (1/2, 1/4, 1/8), so the
# resize starts from other pixels: close, not identical. Measured on these photos: up to
# 3.2/255 mean from Pillow's result, and each path is 0-3/255 from a full-resolution
# decode, the same size of error DCT scaling always had.
MEAN_TOL = 4.0  # mean absolute difference, out of 255
P99_TOL = 40  # 99th percentile of the absolute difference (edges differ the most)


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.mean() < MEAN_TOL and np.percentile(diff, 99) <= P99_TOL, (
        f"mean {diff.mean():.2f}, p99 {np.percentile(diff, 99)}")


def _both(data: bytes, **kw) -> tuple[np.ndarray, np.ndarray]:
    fast = decode_image(data, DecodeOptions(decoder="simplejpeg", **kw))
    ref = decode_image(data, DecodeOptions(decoder="pillow", **kw))
    return fast, ref


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    rng = random.Random(0)
    return [random_crop(rng, photo(name), side)
            for name, side in [("astronaut", 1400), ("cat", 640), ("coffee", 300), ("rocket", 517)]]


@pytest.mark.parametrize("aspect", [{}, {"crop_to_aspect_ratio": True}, {"pad_to_aspect_ratio": True}])
@pytest.mark.parametrize("size", [(224, 224), (96, 160), (300, 300)])
def test_simplejpeg_matches_pillow(photos, size, aspect):
    for im in photos:
        _close(*_both(_jpeg(im, quality=85), image_size=size, **aspect))


@pytest.mark.parametrize("save", [{"progressive": True}, {"subsampling": 0}, {"subsampling": 1},
                                  {"quality": 60}])
def test_jpeg_flavours(photos, save):
    _close(*_both(_jpeg(photos[0], **save), image_size=(224, 224)))


def test_grayscale(photos):
    rgb_jpeg = _jpeg(photos[1])
    gray_jpeg = _jpeg(photos[1].convert("L"))
    _close(*_both(rgb_jpeg, image_size=(64, 64), color_mode="grayscale"))
    _close(*_both(gray_jpeg, image_size=(64, 64), color_mode="grayscale"))
    _close(*_both(gray_jpeg, image_size=(64, 64)))  # grey JPEG -> rgb: three equal channels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(photos, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(photos[1], exif=exif.tobytes())
    assert jpeg_orientation(data) == orientation
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == orientation
    _close(*_both(data, image_size=(120, 80)))
    _close(*_both(data, image_size=(120, 80), crop_to_aspect_ratio=True))


def test_orientation_big_endian_and_absent():
    im = Image.new("RGB", (40, 20), "red")
    assert jpeg_orientation(_jpeg(im)) == 1
    # a big-endian ("MM") TIFF block holding only the orientation, 6
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00" + b"\x00" * 4
    data = _jpeg(im, exif=b"Exif\x00\x00" + tiff)
    assert jpeg_orientation(data) == 6
    with Image.open(io.BytesIO(data)) as pil:
        assert pil.getexif().get(0x0112) == 6
    fast, ref = _both(data, image_size=(40, 20))
    assert fast.shape == ref.shape == (40, 20, 3)


def test_xmp_only_orientation_is_left_to_pillow():
    im = Image.new("RGB", (40, 20), "red")
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = _jpeg(im, xmp=xmp)
    assert jpeg_orientation(data) is None  # Pillow reads tiff:Orientation from the XMP
    out = decode_image(data, DecodeOptions(image_size=(20, 40)))
    ref = decode_image(data, DecodeOptions(image_size=(20, 40), decoder="pillow"))
    assert (out == ref).all()


def _app1(body: bytes) -> bytes:
    return b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body


def _exif_app1(orientation: int | None) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Camera"  # a make, so a block without an orientation is not empty
    if orientation is not None:
        exif[0x0112] = orientation
    return _app1(exif.tobytes())  # starts with "Exif\0\0"


_XMP6 = _app1(b"http://ns.adobe.com/xap/1.0/\x00"
              b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')


@pytest.mark.parametrize("segments", [
    [_exif_app1(None), _XMP6],  # EXIF without the tag: Pillow falls back to the XMP
    [_XMP6, _exif_app1(None)],
    [_exif_app1(1), _exif_app1(6)],  # Pillow reads the first EXIF block only
    [_exif_app1(None), _exif_app1(6)],
    [_XMP6, _exif_app1(3)],  # an EXIF tag wins over the XMP
], ids=["exif-no-tag+xmp", "xmp+exif-no-tag", "exif1+exif6", "exif-no-tag+exif6", "xmp+exif3"])
def test_orientation_agrees_with_pillow_whatever_the_app1_segments(segments):
    """The marker-only orientation (reader's fast decode, packer's width/height) is
    Pillow's, or None (ask Pillow): never another value."""
    from packer.headers import fast_jpeg_info

    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 255  # left half black: a rotation shows
    plain = _jpeg(Image.fromarray(a), quality=95)
    data = plain[:2] + b"".join(segments) + plain[2:]
    with Image.open(io.BytesIO(data)) as im:
        pillow = im.getexif().get(0x0112, 1)
    assert jpeg_orientation(data) in (None, pillow)
    info = fast_jpeg_info(data)
    assert info is None or info.orientation == pillow
    options = DecodeOptions(image_size=(40, 40))
    fast = decode_image(data, options)
    ref = decode_image(data, dataclasses.replace(options, decoder="pillow"))
    assert np.abs(fast.astype(int) - ref.astype(int)).mean() < MEAN_TOL


def test_what_simplejpeg_cannot_take_goes_to_pillow(photos):
    cmyk = _jpeg(photos[3].convert("CMYK"))
    grey = DecodeOptions(image_size=(32, 32), color_mode="grayscale")  # CMYK to grey: Pillow's
    assert (decode_image(cmyk, grey) == decode_image(cmyk, dataclasses.replace(grey, decoder="pillow"))).all()
    # to RGB simplejpeg takes it, in TensorFlow's arithmetic (tests/test_tf_data.py: Keras'
    # pixels exactly), a few levels from Pillow's
    rgb = DecodeOptions(image_size=(32, 32), dct_scaling=False)
    diff = decode_image(cmyk, rgb).astype(int) - decode_image(cmyk, dataclasses.replace(rgb, decoder="pillow"))
    assert 0 < np.abs(diff).max() <= 16 and np.abs(diff).mean() < 2
    data = _jpeg(photos[3])
    rgba = DecodeOptions(image_size=(32, 32), color_mode="rgba")
    assert (decode_image(data, rgba) == decode_image(data, dataclasses.replace(rgba, decoder="pillow"))).all()
    with pytest.raises(OSError):  # truncated: the same error as Pillow's, not a partial image
        decode_image(data[: len(data) // 2], DecodeOptions(image_size=(32, 32)))


def test_unknown_decoder():
    with pytest.raises(ValueError, match="decoder must be one of"):
        DecodeOptions(decoder="turbo")


# ---- batches: chunked decoding into aligned arrays, same as decoding one by one ----------


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """25 samples: JPEGs of many sizes, a PNG, and one broken image (key s0011)."""
    rng = random.Random(1)
    tmp = tmp_path_factory.mktemp("mixed")
    images = []
    with wds.ShardWriter(str(tmp / "m-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(25):
            im = random_crop(rng, photo(["cat", "coffee", "rocket"][i % 3]), rng.randint(40, 700))
            if i == 11:
                data, ext = b"\xff\xd8 not really a jpeg", "jpg"
            elif i == 7:
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
            else:
                data, ext = _jpeg(im, quality=rng.randint(70, 95)), "jpg"
            images.append(data)
            sink.write({"__key__": f"s{i:04d}", ext: data, "cls": i % 3})
    return str(tmp / "m-{000000..000002}.tar"), images


@pytest.mark.parametrize("batch_size", [1, 4, 7, 64])
@pytest.mark.parametrize("rescale", [None, 1 / 255])
@pytest.mark.parametrize("num_workers", [None, 16])  # 16: one-image tasks, many blocks in flight
def test_batches_match_one_by_one(mixed_shards, batch_size, rescale, num_workers):
    url, images = mixed_shards
    r = ShardReader(url, num_classes=3, image_size=(48, 40), batch_size=batch_size, shuffle=False,
                    on_error="ignore", rescale=rescale, num_workers=num_workers)
    batches = list(r)
    kept = [i for i in range(25) if i != 11]
    read = -(-len(kept) // batch_size)  # then an epoch a batch short repeats its first
    assert len(batches) == len(r) and all(
        np.array_equal(a[0], b[0]) for a, b in zip(batches[read:], batches, strict=False))
    batches = batches[:read]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert y.tolist() == [i % 3 for i in kept]
    assert [len(b[0]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert x.dtype == np.float32
    assert all(b[0].ctypes.data % 64 == 0 for b in batches)  # TensorFlow takes them as they are
    options = r.decode_options
    # one by one into float32 rows, as the batch's rows are (a bilinear resize may be float32)
    expected = np.stack([decode_image(images[i], options, out=np.empty(options.shape, np.float32))
                         for i in kept])
    if rescale is not None:
        expected *= np.float32(rescale)
    assert np.array_equal(x, expected)
    assert r.policy.skipped_samples == 1


def test_reader_fast_and_reference_decoders_agree(mixed_shards):
    url, _ = mixed_shards
    fast = ShardReader(url, num_classes=3, image_size=(64, 64), batch_size=8, shuffle=True, seed=3,
                       on_error="ignore", drop_remainder=True)
    ref = ShardReader(url, num_classes=3, image_size=(64, 64), batch_size=8, shuffle=True, seed=3,
                      on_error="ignore", drop_remainder=True)
    ref.decode_options = dataclasses.replace(ref.decode_options, decoder="pillow")
    got, want = list(fast), list(ref)
    assert len(got) == len(want) == 3
    for (xf, yf), (xr, yr) in zip(got, want, strict=True):
        assert (yf == yr).all()
        _close(xf.astype(np.uint8), xr.astype(np.uint8))


def test_broken_sample_raises_in_order(mixed_shards):
    url, _ = mixed_shards
    r = ShardReader(url, num_classes=3, image_size=(16, 16), batch_size=4, shuffle=False,
                    on_error="raise")
    seen = 0
    with pytest.raises(SampleDecodeError, match="s0011"):
        for x, _ in r:
            seen += len(x)
    assert seen == 8  # the batches before the broken sample's batch came out


def test_tf_dataset_equals_reader(mixed_shards):
    pytest.importorskip("tensorflow")
    from reader import image_dataset_from_shards

    url, _ = mixed_shards
    ds = image_dataset_from_shards(url, num_classes=3, image_size=(32, 32), batch_size=5,
                                   shuffle=False, on_error="ignore", verbose=False)
    r = ShardReader(url, num_classes=3, image_size=(32, 32), batch_size=5, shuffle=False,
                    on_error="ignore")
    for (xt, yt), (xr, yr) in zip(ds, r, strict=True):
        assert xt.dtype.name == "float32" and np.array_equal(xt.numpy(), xr)
        assert np.array_equal(yt.numpy(), yr)


# ---- decoding into a row reuses its thread's work arrays ----------------------------------


def _row_options(color_mode: str) -> DecodeOptions:
    return DecodeOptions(image_size=(224, 224), color_mode=color_mode)


def _in_fresh_thread(fn):
    """``fn()`` run on a new thread: one whose work arrays are still to be made."""
    out, errors = [], []

    def run():
        try:
            out.append(fn())
        except BaseException as exc:  # re-raised here, where pytest sees it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def _oriented(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(im, quality=90, exif=exif.tobytes())


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
@pytest.mark.parametrize("side", [300, 1400])  # float32: resized in float32, or resized as uint8 then cast
@pytest.mark.parametrize("turn", ["none", "exif", "flip", "pad"])
def test_a_row_decode_makes_no_image_sized_arrays(photos, dtype, color_mode, side, turn):
    """A decode into a batch row allocates nothing the size of an image once its thread has
    decoded one: every array 128 KB or larger is a fresh mmap, paged in again, wherever a
    malloc threshold is set (Dask workers, TensorFlow's from_generator). Also for a photo
    turned upright by its EXIF orientation, one mirrored by random_flip, and one padded to
    the row's aspect ratio."""
    im = photos[0].resize((side, side * 3 // 4))
    data = _oriented(im, 6) if turn == "exif" else _jpeg(im, quality=90)
    options = dataclasses.replace(_row_options(color_mode), random_flip=turn == "flip",
                                  pad_to_aspect_ratio=turn == "pad")
    row = np.zeros(options.shape, dtype)
    flips = random.Random(1)  # its first draw flips: random() < 0.5
    assert turn != "flip" or random.Random(1).random() < 0.5

    def peak_of_second_decode() -> int:
        decode_image(data, options, out=row, rng=random.Random(1))  # makes this thread's work arrays
        tracemalloc.start()
        try:
            decode_image(data, options, out=row, rng=flips)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # a decoded image here is 50-600 KB, its float32 copy 4 times that
    assert _in_fresh_thread(peak_of_second_decode) < 16 * 1024


_VARIANTS = [
    _row_options("rgb"),
    _row_options("grayscale"),
    DecodeOptions(image_size=(96, 160), crop_to_aspect_ratio=True),
    DecodeOptions(image_size=(96, 160), random_crop=(0.5, 1.0), random_flip=True),
    DecodeOptions(image_size=(300, 300), random_flip=True),  # upscales the small ones
    DecodeOptions(image_size=(448, 448), interpolation="bicubic"),  # a uint8 resize, cast
    DecodeOptions(image_size=(96, 160), pad_to_aspect_ratio=True, random_flip=True),
]


def _variant_images() -> list[bytes]:
    rng = random.Random(5)
    crops = [random_crop(rng, photo(name), side) for name, side in
             [("astronaut", 1400), ("coffee", 120), ("cat", 640), ("rocket", 230), ("astronaut", 900)]]
    return ([_jpeg(im, quality=85) for im in crops]
            + [_jpeg(crops[2].resize(size), quality=85) for size in [(100, 75), (53, 37)]]
            + [_oriented(crops[2], 6), _oriented(crops[3], 7)])


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("work_max", [None, 1000])  # 1000 bytes: nothing is kept for reuse
def test_rows_decoded_one_after_another_are_each_images_own(dtype, work_max, monkeypatch):
    """Rows decoded one after another on one thread (its work arrays left holding the last,
    larger or smaller image) equal each image decoded alone on a new thread, and the
    array ``decode_image`` returns without ``out`` (no work arrays): exactly as uint8 rows,
    within a bilinear resize's rounding as float32 rows."""
    if work_max is not None:
        monkeypatch.setattr(decode_module, "_WORK_MAX_BYTES", work_max)
    images = _variant_images()
    cases = [(options, i, data) for options in _VARIANTS for i, data in enumerate(images)]

    def decode(options: DecodeOptions, i: int, data: bytes) -> np.ndarray:
        return decode_image(data, options, out=np.zeros(options.shape, dtype), rng=random.Random(i))

    one_thread = _in_fresh_thread(lambda: [decode(*case) for case in cases])
    for case, got in zip(cases, one_thread, strict=True):
        assert np.array_equal(got, _in_fresh_thread(lambda case=case: decode(*case)))
        options, i, data = case
        alone = decode_image(data, options, rng=random.Random(i))
        if dtype == np.uint8:
            assert np.array_equal(got, alone)
        else:
            assert np.abs(got - alone).max() <= 1.0


def test_an_array_decode_image_returns_is_never_a_work_array(photos):
    """Without ``out``, decode_image's array is the caller's to keep: the next decodes on
    the thread must not write over it. Here each image needs no resize, so the decoded (or
    turned, or mirrored) array itself is what comes back."""
    options = _row_options("rgb")
    square = [im.resize((224, 224)) for im in photos[:2]]
    kept_cases = [
        (_jpeg(square[0], quality=90), options),
        (_oriented(square[1], 6), options),
        (_jpeg(square[0], quality=90), dataclasses.replace(options, random_flip=True)),
        (_jpeg(photos[1].resize((448, 448)), quality=90), options),  # decoded at 1/2
        (_jpeg(photos[2].resize((448, 224)), quality=90),
         DecodeOptions(image_size=(112, 224), pad_to_aspect_ratio=True)),
    ]
    later = _variant_images()

    def keep_then_decode_into_rows() -> list[tuple[np.ndarray, np.ndarray]]:
        kept = []  # random.Random(1) flips on its first draw: random_flip's path too
        for data, opts in kept_cases:
            arr = decode_image(data, opts, rng=random.Random(1))
            kept.append((arr, arr.copy()))
            for other in later:
                for dtype in (np.float32, np.uint8):
                    decode_image(other, dataclasses.replace(opts, random_flip=True),
                                 out=np.zeros(opts.shape, dtype), rng=random.Random(1))
        return kept

    for arr, copy in _in_fresh_thread(keep_then_decode_into_rows):
        assert np.array_equal(arr, copy)
