"""pack() end to end on real files: the bad-input zoo, realistic photos, shard limits,
class mixing, determinism, duplicates and the flat layout. No mocks of the packer."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from zoo import SMALL, build_zoo, read_samples, tree_files

from packer import pack
from packer.errors import LayoutError, PackError
from packer.examples import make_example_tree
from packer.format import MANIFEST_NAME
from packer.summary import pack_summary

SYMLINK_DIRS = {"train/coffee/loop", "train/cat/nested/up", "train/cat/nested/deeper/up2"}


@pytest.fixture(scope="module")
def zoo_packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    zoo = build_zoo(root)
    packs = {}
    for follow in (False, True):
        out = root / f"out_follow_{follow}"
        manifest = pack(zoo.src, out, workers=1, quiet=True, max_count=4, follow_links=follow)
        packs[follow] = (out, manifest)
    return zoo, packs


@pytest.mark.parametrize("follow", [False, True], ids=["no-follow", "follow-links"])
def test_zoo_every_input_accounted_for(zoo_packs, follow):
    zoo, packs = zoo_packs
    out, manifest = packs[follow]
    want_packed, want_skipped = zoo.expected(follow)
    samples = [row for rows in read_samples(out, manifest).values() for row in rows]
    got = Counter(json.loads(members["json"])["path"] for _, _, members in samples)
    assert set(got) == set(want_packed), "packed set differs"
    assert all(n == 1 for n in got.values()), "a file was packed more than once"

    classes = manifest["classes"]
    assert classes == ["cat", "coffee", "empty_class"]
    for shard, key, members in samples:
        meta = json.loads(members["json"])
        split, class_name, ext, size = want_packed[meta["path"]]
        assert shard.startswith(f"{split}/") and key.startswith(f"{split}_")
        assert meta["class"] == class_name and meta["label"] == classes.index(class_name)
        assert int(members["cls"]) == meta["label"]
        assert set(members) == {ext, "cls", "json"}, meta["path"]
        assert members[ext] == (zoo.src / meta["path"]).read_bytes()  # original bytes
        if size is not None:
            assert (meta["width"], meta["height"]) == size, meta["path"]

    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(want_skipped)
    for path, words in want_skipped.items():
        assert words.lower() in skipped[path].lower(), (path, skipped[path])
        assert skipped[path], path

    ignored = {e["path"] for e in manifest["ignored_examples"]}
    want_ignored = zoo.ignored | SYMLINK_DIRS | (set() if follow else zoo.ignored_unless_followed)
    assert manifest["ignored"] == len(want_ignored)
    assert ignored == want_ignored
    # packed + skipped + ignored = every file in the tree (a folder link that is followed:
    # the files in it), with no overlap
    files = tree_files(zoo.src)
    if follow:
        files = files - zoo.ignored_unless_followed | set(zoo.packed_if_followed)
    assert set(got) | set(skipped) | ignored == files
    assert not (set(got) & set(skipped))
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    assert sum(counts.values()) == len(want_packed)
    assert manifest["splits"]["test"]["class_counts"]["empty_class"] == 0


def test_zoo_cycles_detected_only_when_following(zoo_packs):
    _, packs = zoo_packs
    assert not any("cycle" in w for w in packs[False][1]["warnings"])
    cycles = [w for w in packs[True][1]["warnings"] if "cycle" in w]
    assert len(cycles) == len(SYMLINK_DIRS)


def test_zoo_shards_read_by_webdataset_and_tar(zoo_packs):
    _, packs = zoo_packs
    out, manifest = packs[True]
    classes = manifest["classes"]
    keys = []
    for info in manifest["splits"].values():
        urls = [str(out / s["name"]) for s in info["shards"]]
        n = 0
        for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
            n += 1
            key = sample["__key__"]
            keys.append(key)
            assert "." not in key
            meta = sample["json"]
            assert meta["path"].split("/")[1] == classes[sample["cls"]]
            assert sample["cls"] == meta["label"]
            images = [k for k in sample if not k.startswith("__") and k not in ("cls", "json")]
            assert len(images) == 1
            assert isinstance(sample[images[0]], Image.Image)
        assert n == info["count"]
        for entry in info["shards"]:
            listing = subprocess.run(["tar", "-tf", str(out / entry["name"])], check=True,
                                     capture_output=True, text=True).stdout.split()
            assert len(listing) == 3 * entry["count"]
            for image, cls, meta in zip(listing[::3], listing[1::3], listing[2::3], strict=True):
                key = image.split(".")[0]
                assert (cls, meta) == (f"{key}.cls", f"{key}.json")
    assert len(keys) == len(set(keys))
    # FORMAT.md's to_tuple spelling takes every image a pack may hold (the zoo has them all)
    extensions = "jpg;png;webp;gif;bmp;tiff"
    assert set(extensions.split(";")) >= {k.rsplit(".", 1)[-1] for k in keys_of_images(out, manifest)}
    for info in manifest["splits"].values():
        urls = [str(out / s["name"]) for s in info["shards"]]
        pairs = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple(extensions, "cls"))
        assert len(pairs) == info["count"] and all(isinstance(im, Image.Image) for im, _ in pairs)
    assert f'to_tuple("{extensions}", "cls")' in (Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text()


def keys_of_images(out: Path, manifest: dict) -> list[str]:
    """Member names of every image in a pack (by tar listing)."""
    names = []
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            listing = subprocess.run(["tar", "-tf", str(out / entry["name"])], check=True,
                                     capture_output=True, text=True).stdout.split()
            names += listing[::3]
    return names


def test_zoo_resized_odd_modes(tmp_path):
    """--resize re-encodes CMYK, 16-bit, palette+alpha, RGBA and EXIF-rotated inputs."""
    zoo = build_zoo(tmp_path, good_per_class=2)
    manifest = pack(zoo.src, tmp_path / "out", workers=1, quiet=True, resize=12)
    samples = {json.loads(m["json"])["path"]: m for rows in read_samples(tmp_path / "out", manifest).values()
               for _, _, m in rows}
    assert set(samples) == set(zoo.packed)
    for path, members in samples.items():
        meta = json.loads(members["json"])
        ext = "png" if path.endswith(("rgba.png", "palette_transparent.png")) else "jpg"
        assert ext in members, path
        with Image.open(io.BytesIO(members[ext])) as im:
            assert im.size == (meta["width"], meta["height"])
            assert min(im.size) <= 12
    exif = json.loads(samples["train/cat/exif6.jpg"]["json"])
    assert exif["height"] > exif["width"]  # rotated upright: 20 wide, 40 high before resize
    with Image.open(io.BytesIO(samples["train/cat/gray16.png"]["jpg"])) as im:
        assert im.mode == "L" and 100 < max(im.getdata()) < 150  # scaled, not clipped to white


def test_resize_keeps_the_colour_under_transparent_pixels(tmp_path):
    """A reader in rgb mode drops alpha (TensorFlow's decode too): the colour under fully
    transparent pixels is what it shows. Pillow's RGBA resize premultiplies and made it
    black, so resized shards trained on other pixels than the originals."""
    from reader import ShardReader

    pixels = np.zeros((40, 60, 4), np.uint8)
    pixels[:, :30] = (255, 0, 0, 0)  # transparent red
    pixels[:, 30:] = (0, 0, 255, 255)  # opaque blue
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "src" / "train" / "a" / "half.png")
    images = {}
    for name, resize in (("original", None), ("resized", 20)):
        pack(tmp_path / "src", tmp_path / name, workers=1, quiet=True, resize=resize)
        reader = ShardReader(tmp_path / name, split="train", image_size=(20, 30), batch_size=1,
                             shuffle=False, dct_scaling=False)
        images[name] = next(iter(reader))[0][0]
    assert images["original"][:, :10].mean(axis=(0, 1)).round().tolist() == [255, 0, 0]
    away_from_the_edge = np.r_[0:12, 18:30]  # LANCZOS and bilinear differ at the red/blue edge
    diff = np.abs(images["resized"] - images["original"])[:, away_from_the_edge]
    assert diff.max() <= 2


@pytest.mark.parametrize("resize,size", [(None, (40, 40)), (256, (40, 40)), ("40x40", (40, 40)),
                                         ("20x20", (20, 20))])
@pytest.mark.parametrize("palette", ["colour", "grey"])
def test_resize_keeps_a_gifs_transparent_pixels_black(tmp_path, resize, size, palette):
    """The reader shows a GIF's transparent pixels black, as TensorFlow's GIF decoder (and
    so Keras) does, whatever colour the palette holds there. --resize stores a transparent
    GIF as an RGBA PNG, whose colour under alpha 0 a reader in rgb mode shows: it was the
    palette's (green here, 200/255 off), so resized shards trained on other pixels than
    the originals; it is black now, whether the GIF is resized (20x20) or only re-encoded.
    A grey-ramp palette, which Pillow opens as L, too (the reader showed its grey)."""
    from reader import ShardReader

    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    if palette == "colour":
        im = Image.new("P", (40, 40), 1)
        im.paste(2, (0, 0, 20, 40))  # left half opaque red, right half the transparent index
        im.putpalette([0, 0, 0, 10, 200, 10, 250, 40, 40] + [0] * 759)
        im.save(tmp_path / "src" / "train" / "a" / "half.gif", transparency=1)
        left = [250, 40, 40]
    else:
        grey = np.full((40, 40), 200, np.uint8)
        grey[:, :20] = 50  # left half opaque grey 50, right half the transparent grey 200
        Image.fromarray(grey, "L").save(tmp_path / "src" / "train" / "a" / "half.gif", transparency=200,
                                        optimize=False)
        with Image.open(tmp_path / "src" / "train" / "a" / "half.gif") as opened:
            opened.load()
            assert opened.mode == "L"  # the premise: Pillow loads a grey-ramp GIF as L
        left = [50, 50, 50]
    pack(tmp_path / "src", tmp_path / "out", workers=1, quiet=True, resize=resize)
    reader = ShardReader(tmp_path / "out", split="train", image_size=size, batch_size=1, shuffle=False,
                         interpolation="nearest", dtype="uint8")
    x = next(iter(reader))[0][0]
    half = size[1] // 2
    inside = slice(0, half - 2), slice(half + 2, None)  # LANCZOS blends the halves at the edge
    assert np.abs(x[:, inside[0]].astype(np.int16) - np.array(left, np.int16)).max() <= 3  # LANCZOS rings a little
    assert x[:, inside[1]].max() <= 3


def test_resize_stores_a_jpeg_already_at_the_size_as_it_came(tmp_path):
    """Re-encoding a JPEG that needs no resize only loses quality: it is stored byte for
    byte; a larger one, and a small PNG (stored as JPEG), are re-encoded."""
    from packer.examples import photo

    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    small = photo("cat").resize((40, 30))
    small.save(tmp_path / "src" / "train" / "a" / "small.jpg", quality=95)
    small.save(tmp_path / "src" / "train" / "a" / "small.png")
    small.resize((80, 60)).save(tmp_path / "src" / "train" / "a" / "large.jpg", quality=95)
    for resize in (30, "40x30"):
        manifest = pack(tmp_path / "src", tmp_path / f"out{resize}", workers=1, quiet=True, resize=resize)
        stored = {json.loads(m["json"])["path"].rsplit("/", 1)[1]: m
                  for rows in read_samples(tmp_path / f"out{resize}", manifest).values() for _, _, m in rows}
        assert stored["small.jpg"]["jpg"] == (tmp_path / "src" / "train" / "a" / "small.jpg").read_bytes()
        assert "jpg" in stored["small.png"] and "png" not in stored["small.png"]
        with Image.open(io.BytesIO(stored["large.jpg"]["jpg"])) as im:
            assert im.size == (40, 30)


def test_resize_keeps_the_colour_profiles_that_say_something(tmp_path):
    """A photo tagged Adobe RGB (skimage's rocket) lost its profile when re-encoded, so a
    viewer showed the packed copy duller than the original; a grey dot-gain profile too.
    Kept now, in the JPEG and in a PNG with alpha; an sRGB profile (what an untagged image
    means anyway, 3 KB a photo) and one of another colour space than the stored pixels (a
    grey profile on RGB pixels, a CMYK one after the ink became RGB) are left out, from a
    PNG too (Pillow's PNG writer took the source's from the image's info unless told
    otherwise); one LittleCMS cannot read is kept as it came, and its image packed. The
    pixels are the same with the profile as without it."""
    import skimage
    from PIL import ImageCms

    data = Path(skimage.__file__).parent / "data"
    with Image.open(data / "rocket.jpg") as im:
        adobe = im.info["icc_profile"]
    with Image.open(data / "page.png") as im:
        dot_gain = im.info["icc_profile"]
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk = bytearray(adobe)
    cmyk[16:20] = b"CMYK"  # a CMYK colour space in its header (what the check reads)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    folder = tmp_path / "src" / "train" / "a"
    folder.mkdir(parents=True)
    rgb.save(folder / "adobe.jpg", quality=95, icc_profile=adobe)
    rgb.save(folder / "plain.jpg", quality=95)
    rgb.save(folder / "srgb.jpg", quality=95, icc_profile=srgb)
    rgb.save(folder / "grey_profile_on_rgb.jpg", quality=95, icc_profile=dot_gain)
    rgb.convert("L").save(folder / "grey.png", icc_profile=dot_gain)
    rgb.convert("RGBA").save(folder / "alpha.png", icc_profile=adobe)
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95, icc_profile=bytes(cmyk))
    rgb.convert("RGBA").save(folder / "alpha_srgb.png", icc_profile=srgb)
    rgb.convert("LA").save(folder / "grey_alpha.png", icc_profile=dot_gain)  # stored RGBA
    # a description LittleCMS cannot read (Pillow decodes the image): kept as it came
    odd = bytearray(adobe)
    desc = next(int.from_bytes(adobe[at + 4:at + 8], "big") for at in range(132, 132 + 12 * 10, 12)
                if adobe[at:at + 4] == b"desc")
    odd[desc + 12] = 0xC8
    with pytest.raises(ImageCms.PyCMSError):
        ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(bytes(odd))))
    rgb.save(folder / "odd_profile.jpg", quality=95, icc_profile=bytes(odd))
    manifest = pack(tmp_path / "src", tmp_path / "out", workers=1, quiet=True, resize=30)
    stored = {json.loads(m["json"])["path"].rsplit("/", 1)[1]: m
              for rows in read_samples(tmp_path / "out", manifest).values() for _, _, m in rows}

    def profile_and_pixels(name: str) -> tuple[bytes | None, np.ndarray]:
        sample = stored[name]
        with Image.open(io.BytesIO(sample.get("jpg") or sample["png"])) as im:
            return im.info.get("icc_profile"), np.asarray(im)

    assert profile_and_pixels("adobe.jpg")[0] == adobe
    assert profile_and_pixels("alpha.png")[0] == adobe
    assert profile_and_pixels("grey.png")[0] == dot_gain
    assert profile_and_pixels("odd_profile.jpg")[0] == bytes(odd)
    for dropped in ("plain.jpg", "srgb.jpg", "grey_profile_on_rgb.jpg", "cmyk.jpg", "alpha_srgb.png",
                    "grey_alpha.png"):
        assert profile_and_pixels(dropped)[0] is None, dropped
    assert np.array_equal(profile_and_pixels("adobe.jpg")[1], profile_and_pixels("plain.jpg")[1])


def test_zoo_resized_to_an_exact_size(tmp_path):
    """--resize 16x12 stores every image (odd modes, EXIF-turned, small ones enlarged) at
    exactly 16x12, and the manifest records the size."""
    zoo = build_zoo(tmp_path, good_per_class=2)
    manifest = pack(zoo.src, tmp_path / "out", workers=1, quiet=True, resize="16x12", quality=80)
    assert manifest["options"]["resize"] == {"width": 16, "height": 12, "quality": 80}
    samples = [m for rows in read_samples(tmp_path / "out", manifest).values() for _, _, m in rows]
    assert len(samples) == len(zoo.packed)
    for members in samples:
        meta = json.loads(members["json"])
        ext = "png" if "png" in members else "jpg"
        with Image.open(io.BytesIO(members[ext])) as im:
            assert im.size == (meta["width"], meta["height"]) == (16, 12), meta["path"]


# ---- realistic photos ------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    make_example_tree(root / "src", counts={"train": 30, "test": 8}, long_side=SMALL, seed=3)
    return root / "src"


def _shas(manifest):
    return [(s["name"], s["sha256"]) for info in manifest["splits"].values() for s in info["shards"]]


def test_class_mixing_and_max_count(photo_src, tmp_path):
    manifest = pack(photo_src, tmp_path / "out", workers=1, quiet=True, max_count=8)
    samples = read_samples(tmp_path / "out", manifest)
    for split, info in manifest["splits"].items():
        assert [s["count"] for s in info["shards"]][:-1] == [8] * (len(info["shards"]) - 1)
        assert all(1 <= s["count"] <= 8 for s in info["shards"])
        assert info["count"] == sum(info["class_counts"].values()) == len(samples[split])
        by_shard = {}
        for shard, _, members in samples[split]:
            by_shard.setdefault(shard, []).append(int(members["cls"]))
        for shard, labels in by_shard.items():
            if len(labels) >= 4:
                assert len(set(labels)) > 1, f"{shard} holds one class only"
    assert manifest["splits"]["train"]["class_counts"] == dict.fromkeys(manifest["classes"], 30)


def test_max_size_respected_exactly(photo_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(photo_src, src)
    big = Image.frombytes("RGB", (120, 120), random.Random(0).randbytes(120 * 120 * 3))
    big.save(src / "train" / "cat" / "big.png")  # ~43 KB of poorly compressible pixels
    limit = 30_000
    manifest = pack(src, tmp_path / "out", workers=1, quiet=True, max_size=limit)
    alone = 0
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            size = (tmp_path / "out" / entry["name"]).stat().st_size
            assert size == entry["bytes"]
            if size > limit:
                assert entry["count"] == 1
                alone += 1
    assert alone == 1  # the big PNG, on its own
    (over,) = [w for w in manifest["warnings"] if "--max-size" in w]
    assert over.startswith("1 shard exceeds --max-size 30.0 KB") and "train/cat/big.png" in over
    sizes = [s["bytes"] for s in manifest["splits"]["train"]["shards"]]
    assert max(sizes) > limit and sorted(sizes)[-2] > limit // 2  # shards are filled, not tiny


@pytest.mark.slow
def test_workers_do_not_change_bytes(photo_src, tmp_path):
    one = pack(photo_src, tmp_path / "w1", workers=1, quiet=True, max_count=10)
    four = pack(photo_src, tmp_path / "w4", workers=4, quiet=True, max_count=10)
    again = pack(photo_src, tmp_path / "again", workers=1, quiet=True, max_count=10)
    assert _shas(one) == _shas(four) == _shas(again)
    manifests = [(tmp_path / d / MANIFEST_NAME).read_bytes() for d in ("w1", "w4", "again")]
    assert manifests[0] == manifests[1] == manifests[2]
    for name, sha in _shas(one):
        data = (tmp_path / "again" / name).read_bytes()
        assert data == (tmp_path / "w1" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
    other_seed = pack(photo_src, tmp_path / "s1", workers=1, quiet=True, max_count=10, seed=1)
    assert _shas(other_seed) != _shas(one)


def test_probe_task_size_changes_no_byte(photo_src, tmp_path, monkeypatch):
    """Cheap probes go 256 files to a task (a task's hand-off cost the parent as much as
    50 files' planning), costly ones (decode, resize) 64, Dask's 1,024, fewer where
    workers would get under 4 tasks each; a pack's bytes are the same whatever the task
    size: the whole tree in one task, or 3 files a task on one worker or two."""
    import packer.job as job
    from packer.transform import parse_resize

    assert job.probe_chunk_size("local", resize=None, validate="structure") == 256
    assert job.probe_chunk_size("local", resize=None, validate="header") == 256
    assert job.probe_chunk_size("local", resize=None, validate="decode") == 64
    assert job.probe_chunk_size("local", resize=parse_resize(32), validate="structure") == 64
    assert job.probe_chunk_size("dask", resize=None, validate="structure") == 1024
    # fewer files per task where workers would otherwise get under 4 tasks each
    assert job.even_probe_chunk(256, 100_000, 2) == 256
    assert job.even_probe_chunk(256, 6_000, 16) == 94
    assert job.even_probe_chunk(64, 30, 2) == 4
    assert job.even_probe_chunk(256, 0, 2) == 1
    assert job.probe_workers("dask", 16, "tcp://127.0.0.1:8786") == 1  # its own size
    assert job.probe_workers("dask", 16, None) == job.probe_workers("local", 16, None) == 16
    monkeypatch.setattr(job, "PROBE_TASKS_PER_WORKER", 1)
    default = pack(photo_src, tmp_path / "default", workers=1, quiet=True, max_count=7)
    monkeypatch.setattr(job, "PROBE_TASKS_PER_WORKER", 4)
    monkeypatch.setattr(job, "PROBE_CHUNK", 3)
    assert job.probe_chunk_size("local", resize=None, validate="decode") == 3
    for workers in (1, 2):
        small = pack(photo_src, tmp_path / f"small{workers}", workers=workers, quiet=True, max_count=7)
        assert _shas(small) == _shas(default)
        assert (tmp_path / f"small{workers}" / MANIFEST_NAME).read_bytes() == \
            (tmp_path / "default" / MANIFEST_NAME).read_bytes()


def test_duplicates_within_and_across_splits(photo_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(photo_src, src)
    shutil.copy(src / "train/cat/img_00003.jpg", src / "test/cat/leak.jpg")
    shutil.copy(src / "train/coffee/img_00001.jpg", src / "train/coffee/copy.jpg")
    manifest = pack(src, tmp_path / "out", workers=1, quiet=True)
    dup = manifest["duplicates"]
    assert [d["paths"] for d in dup["across_splits"]] == [["test/cat/leak.jpg", "train/cat/img_00003.jpg"]]
    assert dup["across_splits"][0]["splits"] == ["test", "train"]
    assert [d["paths"] for d in dup["within_split"]] == [["train/coffee/copy.jpg", "train/coffee/img_00001.jpg"]]
    # each group is named by its files' sha256 (the probes compare a cheaper digest)
    assert dup["across_splits"][0]["sha256"] == hashlib.sha256((src / "test/cat/leak.jpg").read_bytes()).hexdigest()
    assert dup["within_split"][0]["sha256"] == hashlib.sha256((src / "train/coffee/copy.jpg").read_bytes()).hexdigest()
    summary = pack_summary(manifest, str(tmp_path / "out"))
    assert "WARNING" in summary and "leak.jpg" in summary
    assert "1 groups of identical images within a split" in summary


def _flat_tree(photo_src: Path, dest: Path) -> Path:
    for path in (photo_src / "train").glob("*/*.jpg"):
        target = dest / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return dest


def test_flat_layout_validation_split(photo_src, tmp_path):
    flat = _flat_tree(photo_src, tmp_path / "flat")
    a = pack(flat, tmp_path / "a", workers=1, quiet=True, validation_split=0.2, seed=5)
    b = pack(flat, tmp_path / "b", workers=1, quiet=True, validation_split=0.2, seed=5)
    c = pack(flat, tmp_path / "c", workers=1, quiet=True, validation_split=0.2, seed=6)
    assert sorted(a["splits"]) == ["train", "validation"]
    assert a["splits"]["validation"]["class_counts"] == dict.fromkeys(a["classes"], 6)
    assert a["splits"]["train"]["class_counts"] == dict.fromkeys(a["classes"], 24)
    assert _shas(a) == _shas(b)

    def paths(out, manifest, split):
        return {json.loads(m["json"])["path"] for _, _, m in read_samples(out, manifest)[split]}

    val_a, train_a = paths(tmp_path / "a", a, "validation"), paths(tmp_path / "a", a, "train")
    assert not val_a & train_a and len(val_a | train_a) == 120
    assert val_a != paths(tmp_path / "c", c, "validation")  # the seed decides the split


def test_flat_tree_without_validation_split_is_a_layout_error(photo_src, tmp_path):
    flat = _flat_tree(photo_src, tmp_path / "flat")
    with pytest.raises(LayoutError, match="--validation-split"):
        pack(flat, tmp_path / "out", workers=1, quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "workers"), [
    ("rewritten", 1), ("touched", 1), ("replaced_keeping_mtime", 1), ("rewritten", 2),
])
def test_source_changed_between_probe_and_write_is_refused(tmp_path, monkeypatch, change, workers):
    """The writer re-reads each file once; a file whose size or modification time moved since
    the probe read it stops the pack with its name (no shard vouches for unchecked bytes)."""
    import os

    from packer.write_session import WriteSession

    src = make_example_tree(tmp_path / "src", counts={"train": 3}, seed=1)
    victim = sorted(src.rglob("*.jpg"))[0]
    real_add = WriteSession.add

    def plan_then_change(self, shard):  # the shard is planned, not yet written
        planned = real_add(self, shard)
        st = victim.stat()
        if change == "rewritten":
            victim.write_bytes(victim.read_bytes() + b"\0")
        elif change == "touched":  # same bytes, newer modification time
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        else:  # other bytes of the same size, mtime set back (cp -p, rsync -a): ctime tells
            data = bytearray(victim.read_bytes())
            data[-3] ^= 0xFF
            victim.write_bytes(bytes(data))
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        return planned

    monkeypatch.setattr(WriteSession, "add", plan_then_change)
    with pytest.raises(PackError, match=f"{victim.name} changed since it was scanned"):
        pack(src, tmp_path / "out", workers=workers, quiet=True)  # 2: raised in a worker
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_failed_fsync_leaves_no_shard_to_trust(tmp_path, monkeypatch):
    """A shard the disk refused to sync is removed, so a re-run writes it again instead of
    keeping it on the strength of a checksum read back from the page cache."""
    import errno
    import os

    import packer.write as write

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to tell shard files from the journal")
    src = make_example_tree(tmp_path / "src", counts={"train": 3}, seed=2)
    real_fsync = os.fsync

    def failing_fsync(fd):  # the disk refuses shard data only (journal and manifest sync)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tar"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(write.os, "fsync", failing_fsync)
    with pytest.raises(PackError, match="Input/output error"):
        pack(src, tmp_path / "out", workers=1, quiet=True)
    assert not list((tmp_path / "out").rglob("*.tar"))  # written, then removed when sync failed
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    monkeypatch.setattr(write.os, "fsync", real_fsync)
    resumed = pack(src, tmp_path / "out", workers=1, quiet=True)
    clean = pack(src, tmp_path / "clean", workers=1, quiet=True)
    assert resumed["splits"] == clean["splits"]


def test_failed_write_behind_sync_fails_the_shard(tmp_path, monkeypatch):
    """The early fdatasync that starts a shard's disk writing reports a refusing disk as a
    PackError, and leaves no shard file behind."""
    import errno

    import packer.write as write

    src = make_example_tree(tmp_path / "src", counts={"train": 6}, seed=3)

    def failing_datasync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(write, "_BEHIND_BYTES", 1)  # sync behind after every gathered write
    monkeypatch.setattr(write, "_GATHER_BYTES", 1)
    monkeypatch.setattr(write, "_datasync", failing_datasync)
    with pytest.raises(PackError, match="Input/output error"):
        pack(src, tmp_path / "out", workers=1, quiet=True)
    assert not list((tmp_path / "out").rglob("*.tar"))
    assert not list((tmp_path / "out").rglob("*.partial"))


def _shard_hashes(manifest) -> dict[str, str]:
    return {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}


def test_resize_spool_gives_the_same_shards_and_survives_a_damaged_entry(tmp_path, monkeypatch):
    """--resize keeps the probe's re-encoded images in OUT/.shardpack-spool for the writer:
    the shards are byte-identical to re-encoding in the writer; a damaged spool entry left
    by an earlier run is not used; the spool is gone after a finished pack."""
    import packer.job as job
    import packer.write as write
    from packer.spool import SPOOL_NAME

    src = make_example_tree(tmp_path / "src", counts={"train": 5, "test": 2}, seed=4,
                            long_side=(300, 900))
    with_spool = pack(src, tmp_path / "a", workers=1, quiet=True, resize=128)
    assert not (tmp_path / "a" / SPOOL_NAME).exists()

    monkeypatch.setattr(write, "spool_take", lambda *args: None)  # the writer re-encodes
    without = pack(src, tmp_path / "b", workers=1, quiet=True, resize=128)
    monkeypatch.undo()
    assert _shard_hashes(with_spool) == _shard_hashes(without)

    # an earlier run stopped before its first shard was written: its spool is there, one
    # entry damaged
    monkeypatch.setattr(job, "spool_remove", lambda spool: None)
    monkeypatch.setattr(job, "write_task", lambda task: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path / "c", workers=1, quiet=True, resize=128)
    monkeypatch.undo()
    entries = sorted((tmp_path / "c" / SPOOL_NAME).rglob("*.jpg"))
    assert entries
    data = bytearray(entries[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    entries[0].write_bytes(bytes(data))
    resumed = pack(src, tmp_path / "c", workers=1, quiet=True, resize=128)
    assert _shard_hashes(resumed) == _shard_hashes(with_spool)
    assert not (tmp_path / "c" / SPOOL_NAME).exists()


def test_local_pack_writes_shards_while_files_are_still_probed(tmp_path, monkeypatch):
    """On the local pool a shard is written as soon as its files are probed, not after the
    last probe; the bytes are those of the phase-by-phase path (probe all, plan, write)."""
    import packer.job as job

    src = make_example_tree(tmp_path / "src", counts={"train": 24, "test": 6}, seed=5, long_side=SMALL)
    events: list[str] = []
    real_probe, real_write = job._probe_chunk, job.write_task
    monkeypatch.setattr(job, "PROBE_CHUNK", 4)
    monkeypatch.setattr(job, "_probe_chunk", lambda task: (events.append("probe"), real_probe(task))[1])
    monkeypatch.setattr(job, "write_task", lambda task: (events.append("write"), real_write(task))[1])
    streamed = pack(src, tmp_path / "a", workers=1, quiet=True, max_count=5)
    assert events.index("write") < len(events) - 1 - events[::-1].index("probe")
    monkeypatch.undo()

    phased = job._pack_with(
        src, str(tmp_path / "b"), streamed["options"], resize_spec=None, quiet=True,
        run=job._engine_runner("local", workers=1, scheduler=None, pool=job.LocalPool(1)),
        probe_chunk=4, check_workers=None,
    )
    assert _shard_hashes(phased) == _shard_hashes(streamed)
    assert phased == streamed


def test_out_inside_src_is_left_out_of_the_walk(tmp_path):
    """`shardpack pack data data/shards`, run twice: the second walk must not take the
    shards folder for a split (it made `train` and `test` classes and shifted labels)."""
    src = make_example_tree(tmp_path / "data", counts={"train": 4, "test": 2}, seed=3, long_side=SMALL)
    first = pack(src, src / "shards", workers=1, quiet=True)
    again = pack(src, src / "shards", workers=1, quiet=True)
    assert again["classes"] == first["classes"] and sorted(again["splits"]) == ["test", "train"]
    assert again["splits"] == first["splits"]
    assert again == first  # the same manifest, although OUT was not there at the first walk


def test_validation_split_on_a_split_tree_is_refused_not_labelled_by_split(tmp_path):
    """--validation-split reads a flat {class}/ tree; a {split}/{class}/ tree read so got
    the classes "test" and "train" and packed without a word. Now it is refused with what
    to do; --layout flat still packs it for whoever really has such classes."""
    src = make_example_tree(tmp_path / "src", counts={"train": 4, "test": 2}, seed=1, long_side=SMALL)
    with pytest.raises(LayoutError, match="looks like a {split}/{class} tree"):
        pack(src, tmp_path / "out", validation_split=0.2, workers=1, quiet=True)
    assert not (tmp_path / "out").exists()
    forced = pack(src, tmp_path / "forced", validation_split=0.2, layout="flat", workers=1, quiet=True)
    assert forced["classes"] == ["test", "train"]


def test_resized_duplicates_above_pillows_limit_pack_under_a_raised_max_pixels(tmp_path, monkeypatch):
    """Two copies of one large image with --resize: the spool keeps one re-encoded copy, so
    the writer re-encodes the other itself. The probe let it through a raised --max-pixels;
    the writer must not then refuse it by Pillow's own (lower) bomb limit. Pillow's limit
    is lowered here so the images can stay small."""
    import warnings

    from PIL import Image as PILImage

    make_example_tree(tmp_path / "one", counts={"train": 1}, seed=2, long_side=(400, 400))
    photo = next(p for p in (tmp_path / "one").rglob("*.*") if p.suffix in (".jpg", ".png"))
    for name in ("a", "b"):
        dest = tmp_path / "src" / "train" / "big" / f"{name}{photo.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, dest)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # a 400 px photo is a "bomb" now
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        manifest = pack(tmp_path / "src", tmp_path / "out", workers=1, quiet=True, resize=64,
                        max_pixels=10**8)
    assert not [w for w in record if issubclass(w.category, PILImage.DecompressionBombWarning)]
    assert manifest["splits"]["train"]["count"] == 2
    assert PILImage.MAX_IMAGE_PIXELS == 1000  # put back


def test_the_old_default_quality_passes_through_pack_without_resize(tmp_path):
    """Code that always passes quality=90 (the default before `--quality` needed `--resize`)
    still packs; another quality without resize is refused, as on the command line."""
    from conftest import write_id_tree

    write_id_tree(tmp_path / "src", {"train": 1})
    assert pack(tmp_path / "src", tmp_path / "out", quality=90, workers=1, quiet=True)["options"]["resize"] is None
    with pytest.raises(ValueError, match="--quality 80 applies only to images re-encoded"):
        pack(tmp_path / "src", tmp_path / "out2", quality=80, workers=1, quiet=True)


def test_a_worker_process_that_dies_is_a_pack_error_that_says_to_re_run(tmp_path):
    """A pool worker killed mid-pack (the OOM killer) ended the pack in a BrokenProcessPool
    traceback; it is a PackError saying what happened and that a re-run resumes. (In a
    fresh process: its workers are forked, and so die as the patched probe says.)"""
    import sys
    import textwrap

    from conftest import write_id_tree

    write_id_tree(tmp_path / "src", {"train": 30})
    script = textwrap.dedent(f"""
        import os
        import packer.probe as probe
        from packer import pack
        from packer.errors import PackError
        parent, real = os.getpid(), probe.probe_bytes
        def dies_in_a_worker(data, **kwargs):
            if os.getpid() != parent:
                os._exit(9)  # as SIGKILL leaves it: no clean-up, no result
            return real(data, **kwargs)
        probe.probe_bytes = dies_in_a_worker
        try:
            pack({str(tmp_path / "src")!r}, {str(tmp_path / "out")!r}, workers=2, quiet=True)
        except PackError as exc:
            print("PackError:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "PackError: a worker process of the pack died" in done.stdout, done.stderr[-2000:]
    assert "re-run the same command to resume" in done.stdout
    assert pack(tmp_path / "src", tmp_path / "out", workers=2, quiet=True)["splits"]["train"]["count"] == 90


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_pool_workers_end_when_the_pack_is_killed(tmp_path, start):
    """A SIGKILLed pack (the OOM killer) left its pool workers alive for good: they held the
    caller's output pipes open and could still write into OUT beside a re-run. (A process
    running other threads starts its workers from a forkserver, which outlives the pack.)"""
    import os
    import sys
    import textwrap
    import time

    script = textwrap.dedent(f"""
        import os, threading, time
        if {start == "forkserver"}:
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        from packer.engines import LocalPool
        pool = LocalPool(2)
        assert pool._method == {start!r}
        pool.start()
        pids = set()
        while len(pids) < 2:
            pids.add(pool.executor().submit(os.getpid).result())
        print(*sorted(pids), flush=True)
        os.kill(os.getpid(), 9)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2, done.stderr
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}") and
                 open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    assert not alive, f"workers {alive} outlived the killed pack"
