"""The bad-input zoo: a real image tree with every odd file a photo folder collects.

``build_zoo(root)`` writes ``root/src`` (the ``{split}/{class}/`` layout) and returns a
``Zoo`` saying what must happen to every file: packed (with split, class, member extension
and oriented size), skipped (with words the reason must contain) or ignored. Expectations
differ with ``follow_links``, so both are kept.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from packer.examples import random_crop_jpeg

SMALL = (64, 160)  # long side of realistic crops: small keeps the suite fast


@dataclass
class Zoo:
    src: Path
    # rel path -> (split, class, member ext, (width, height) or None)
    packed: dict[str, tuple[str, str, str, tuple[int, int] | None]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # rel path -> reason substring
    ignored: set[str] = field(default_factory=set)
    # differences when follow_links=True
    packed_if_followed: dict[str, tuple[str, str, str, tuple[int, int] | None]] = field(default_factory=dict)
    skipped_unless_followed: dict[str, str] = field(default_factory=dict)
    ignored_unless_followed: set[str] = field(default_factory=set)  # folder links

    def expected(self, follow_links: bool) -> tuple[dict, dict]:
        packed = dict(self.packed)
        skipped = dict(self.skipped)
        if follow_links:
            packed.update(self.packed_if_followed)
        else:
            skipped.update(self.skipped_unless_followed)
        return packed, skipped


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def image_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def heif_like(major: bytes, compatible: bytes) -> bytes:
    """The start of a HEIF-family photo as phones write it: an ``ftyp`` box (major brand,
    version, compatible brands), then a ``meta`` box's header and filler (no HEIF encoder
    is installed here, and no decoder: Pillow fails on a whole file the same way)."""
    ftyp = b"ftyp" + major + b"\0\0\0\0" + compatible
    return struct.pack(">I", 4 + len(ftyp)) + ftyp + struct.pack(">I", 208) + b"meta" + bytes(200)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunk(data: bytes, kind: bytes, body: bytes, *, after_idat: bool = False) -> bytes:
    """``data`` (a PNG) with one more chunk: right after IHDR, or just before IEND."""
    at = data.rfind(b"IEND") - 4 if after_idat else 33
    return data[:at] + png_chunk(kind, body) + data[at:]


_XMP_ORIENTATION_6 = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'


def oriented_pngs(im: Image.Image) -> dict[str, bytes]:
    """``im`` as PNGs that Pillow reads orientation 6 from, each in another chunk: eXIf (also
    between two IDAT chunks), XMP (iTXt) before or after the pixel data (also ending in what
    looks like an IDAT chunk header), ImageMagick's "Raw profile type exif" (zTXt), a tEXt
    chunk with the keyword "exif"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    plain = image_bytes(im, "PNG")
    xmp = b"XML:com.adobe.xmp\0\0\0\0\0" + _XMP_ORIENTATION_6
    raw_exif = "\nexif\n" + f"{len(exif.tobytes()):8d}\n" + exif.tobytes().hex() + "\n"
    start = plain.find(b"IDAT") - 4  # Pillow writes one IDAT chunk here
    end = start + 12 + struct.unpack_from(">I", plain, start)[0]
    return {
        "eXIf": image_bytes(im, "PNG", exif=exif.tobytes()),
        "xmp-before-idat": png_with_chunk(plain, b"iTXt", xmp),
        "xmp-after-idat": png_with_chunk(plain, b"iTXt", xmp, after_idat=True),
        "raw-profile-exif": png_with_chunk(
            plain, b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(raw_exif.encode())),
        "text-exif": png_with_chunk(plain, b"tEXt", b"exif\0" + exif.tobytes(), after_idat=True),
        # an eXIf between the pixel data and an empty IDAT: libpng warns, Pillow reads it
        "exif-between-idats": plain[:end] + png_chunk(b"eXIf", exif.tobytes()) + png_chunk(b"IDAT", b"") + plain[end:],
        # XMP whose text ends like a chunk header "IDAT": a search from the end lands in it
        "xmp-ending-in-idat": png_with_chunk(plain, b"iTXt", xmp + struct.pack(">I", 0) + b"IDAT", after_idat=True),
    }


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking ~70-byte PNG whose IHDR declares ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3)  # one row of a 1x1 image: far too little
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_bomb(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose SOF0 header is patched to declare ``width`` x ``height``."""
    data = bytearray(jpeg_bytes(Image.new("RGB", (8, 8), (200, 10, 10)), quality=90))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def exif_rotated_jpeg(width: int, height: int, orientation: int = 6) -> bytes:
    im = Image.new("RGB", (width, height), (30, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(im, quality=90, exif=exif.tobytes())


def bmp_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A 24-bit BMP written byte by byte (no encoder: the bytes never change)."""
    row = bytes([rgb[2], rgb[1], rgb[0]]) * width
    row += b"\x00" * (-len(row) % 4)
    pixels = row * height
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


def build_zoo(root: Path, *, good_per_class: int = 6, seed: int = 0) -> Zoo:
    """Write the zoo under ``root/src`` and return what must happen to each file."""
    rng = random.Random(seed)
    src = root / "src"
    zoo = Zoo(src)

    def write(rel: str, data: bytes) -> Path:
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def good(rel: str, data: bytes, ext: str, size: tuple[int, int] | None = None) -> None:
        write(rel, data)
        split, class_name = rel.split("/")[:2]
        zoo.packed[rel] = (split, class_name, ext, size)

    def bad(rel: str, data: bytes, reason: str) -> None:
        write(rel, data)
        zoo.skipped[rel] = reason

    def junk(rel: str, data: bytes) -> None:
        write(rel, data)
        zoo.ignored.add(rel)

    # Realistic photos: every split/class gets crops of its own photograph.
    for split, n in (("train", good_per_class), ("test", max(2, good_per_class // 2))):
        for class_name in ("cat", "coffee"):
            for i in range(n):
                data = random_crop_jpeg(rng, class_name, long_side=SMALL)
                with Image.open(io.BytesIO(data)) as im:
                    size = im.size
                good(f"{split}/{class_name}/img_{i:03d}.jpg", data, "jpg", size)

    cat = "train/cat"
    photo_jpeg = random_crop_jpeg(rng, "cat", long_side=SMALL)
    # Names that lie, names with dots and accents, nested folders.
    good(f"{cat}/photo.dat", photo_jpeg, "jpg")  # recognised by content
    good(f"{cat}/jpeg_named.png", random_crop_jpeg(rng, "cat", long_side=SMALL), "jpg")
    good(f"{cat}/png_named.jpg", image_bytes(Image.new("RGB", (20, 12), "red"), "PNG"), "png", (20, 12))
    good(f"{cat}/café.1.jpg", random_crop_jpeg(rng, "cat", long_side=SMALL), "jpg")
    good(f"{cat}/a.b.c.jpeg", random_crop_jpeg(rng, "cat", long_side=SMALL), "jpg")
    good(f"{cat}/UPPER.JPG", random_crop_jpeg(rng, "cat", long_side=SMALL), "jpg")
    good(f"{cat}/nested/deeper/inner.jpg", random_crop_jpeg(rng, "cat", long_side=SMALL), "jpg")
    # Modes a training loader must survive.
    good(f"{cat}/exif6.jpg", exif_rotated_jpeg(40, 20), "jpg", (20, 40))
    good(f"{cat}/cmyk.jpg", jpeg_bytes(Image.new("CMYK", (24, 16), (0, 50, 100, 0))), "jpg", (24, 16))
    i16 = Image.frombytes("I;16", (16, 8), struct.pack("<128H", *range(0, 32768, 256)))  # 0..50%
    good(f"{cat}/gray16.png", image_bytes(i16, "PNG"), "png", (16, 8))
    pal = Image.new("P", (12, 12), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    good(f"{cat}/palette_transparent.png", image_bytes(pal, "PNG", transparency=0), "png", (12, 12))
    good(f"{cat}/rgba.png", image_bytes(Image.new("RGBA", (14, 10), (1, 2, 3, 128)), "PNG"), "png", (14, 10))
    # Other formats.
    coffee = "train/coffee"
    base = Image.new("RGB", (18, 11), (90, 60, 30))
    good(f"{coffee}/pic.webp", image_bytes(base, "WEBP", quality=80), "webp", (18, 11))
    good(f"{coffee}/pic.gif", image_bytes(base.convert("P"), "GIF"), "gif", (18, 11))
    good(f"{coffee}/pic.bmp", bmp_bytes(18, 11, (90, 60, 30)), "bmp", (18, 11))
    good(f"{coffee}/pic.tiff", image_bytes(base, "TIFF"), "tiff", (18, 11))
    good(f"{coffee}/pic2.TIF", image_bytes(base, "TIFF"), "tiff", (18, 11))

    # Broken image-like files: skipped, each with a reason.
    whole = random_crop_jpeg(rng, "coffee", long_side=(150, 160))
    bad(f"{coffee}/truncated.jpg", whole[: len(whole) // 2], "truncated")
    bad(f"{coffee}/empty.jpg", b"", "empty")
    bad(f"{coffee}/text_named.jpg", b"This is not a photo, it is a note.\n" * 5, "not an image")
    bad(f"{coffee}/garbage.png", bytes(random.Random(1).getrandbits(8) for _ in range(3000)), "not an image")
    bad(f"{coffee}/bomb.png", png_bomb(50_000, 50_000), "decompression bomb")
    # Phone photos in formats no reader here decodes, named in no image way: skipped by
    # their content, not counted as non-image files.
    bad(f"{coffee}/IMG_0001.HEIC", heif_like(b"heic", b"mif1heic"), "HEIC image")
    bad(f"{coffee}/IMG_0002.heif", heif_like(b"mif1", b"mif1heic"), "HEIC image")
    bad(f"{coffee}/still.hif", heif_like(b"mif1", b"mif1miaf"), "HEIF image")
    bad(f"{coffee}/bomb_moderate.png", png_bomb(12_000, 12_000), "decompression bomb")
    bad(f"{coffee}/bomb.jpg", jpeg_bomb(50_000, 50_000), "decompression bomb")

    # OS junk and non-images: ignored, only counted.
    for rel in (f"{cat}/.DS_Store", f"{cat}/._img_000.jpg", f"{cat}/Thumbs.db", f"{cat}/notes.txt",
                f"{coffee}/desktop.ini", f"{coffee}/data.dat", ".hidden_at_root", "README.txt"):
        junk(rel, b"\x00\x05\x16\x07junk" if "._" in rel or "DS_" in rel else b"some text\n")
    junk(f"{cat}/LICENSE", b"")  # empty and not named like an image: ignored, not "skipped"
    # An image file outside any class folder, and one outside any split folder.
    bad("train/loose.jpg", random_crop_jpeg(rng, "cat", long_side=SMALL), "outside any class folder")
    bad("stray.jpg", random_crop_jpeg(rng, "cat", long_side=SMALL), "outside any split folder")
    # A class folder that exists only in test (and is empty): it still gets a label.
    (src / "test" / "empty_class").mkdir(parents=True)

    # Symbolic links: a cycle (dir link to its own parent, and one two levels up), a linked
    # image from outside SRC, a dangling link.
    outside = root / "outside"
    outside.mkdir()
    linked = random_crop_jpeg(rng, "coffee", long_side=SMALL)
    (outside / "linked.jpg").write_bytes(linked)
    os.symlink(outside / "linked.jpg", src / coffee / "linked.jpg")
    with Image.open(io.BytesIO(linked)) as im:  # read with or without --follow-links, as Keras reads it
        zoo.packed[f"{coffee}/linked.jpg"] = ("train", "coffee", "jpg", im.size)
    # a folder linked in from outside SRC: its images are packed only with --follow-links
    (outside / "more").mkdir()
    more = random_crop_jpeg(rng, "coffee", long_side=SMALL)
    (outside / "more" / "x.jpg").write_bytes(more)
    os.symlink(outside / "more", src / coffee / "more")
    with Image.open(io.BytesIO(more)) as im:
        zoo.packed_if_followed[f"{coffee}/more/x.jpg"] = ("train", "coffee", "jpg", im.size)
    zoo.ignored_unless_followed.add(f"{coffee}/more")
    os.symlink(".", src / coffee / "loop")
    (src / cat / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    os.symlink("../..", src / cat / "nested" / "up")
    os.symlink("../..", src / cat / "nested" / "deeper" / "up2")  # -> train/cat: an ancestor
    os.symlink(src / "no_such_file.jpg", src / coffee / "dangling.jpg")
    zoo.skipped[f"{coffee}/dangling.jpg"] = "broken symbolic link (to "
    return zoo


def read_samples(out: Path, manifest: dict) -> dict[str, list[tuple[str, str, dict[str, bytes]]]]:
    """Every sample of every split, read with plain ``tarfile``: split -> [(shard, key, members)]."""
    import tarfile

    from packer.format import split_member_name

    samples: dict[str, list[tuple[str, str, dict[str, bytes]]]] = {}
    for split, info in manifest["splits"].items():
        rows = samples.setdefault(split, [])
        for entry in info["shards"]:
            with tarfile.open(out / entry["name"]) as tar:
                for member in tar:
                    key, ext = split_member_name(member.name)
                    if not rows or rows[-1][1] != key or rows[-1][0] != entry["name"]:
                        rows.append((entry["name"], key, {}))
                    rows[-1][2][ext] = tar.extractfile(member).read()
    return samples


def tree_files(src: Path) -> set[str]:
    """Every file and file-or-dangling symlink under ``src`` (links not followed)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(src):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            found.add(Path(os.path.relpath(os.path.join(dirpath, name), src)).as_posix())
    return found
