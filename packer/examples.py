"""Build realistic example image trees from the photographs that ship inside scikit-image.

Used by the demo, the tests and the benchmarks: no network, no committed images. Each class
is one photograph; every sample is a random crop of it (random position, scale, flip, output
size and JPEG quality), so a model must learn what the photo looks like, yet the set is
easy enough for a small network to separate quickly.
"""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

from PIL import Image

__all__ = ["PHOTOS", "photo", "make_example_tree", "random_crop_jpeg"]

# class name -> file inside skimage/data (all ship in the scikit-image wheel)
PHOTOS = {
    "astronaut": "astronaut.png",
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "galaxy": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "horse": "horse.png",
}


def _skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ImportError(
            "example images come from the scikit-image wheel; "
            "install it with `pip install 'shardpack[examples]'` or `pip install scikit-image`"
        )
    return Path(spec.origin).parent / "data"


_CACHE: dict[str, Image.Image] = {}


def photo(name: str) -> Image.Image:
    """Return one of the bundled photographs as an RGB image (cached)."""
    if name not in _CACHE:
        with Image.open(_skimage_data_dir() / PHOTOS.get(name, name)) as im:
            _CACHE[name] = im.convert("RGB")
    return _CACHE[name]


def random_crop(rng: random.Random, source: Image.Image, long_side: int) -> Image.Image:
    """Return a random crop of ``source``, resized so its long side is ``long_side``."""
    w, h = source.size
    scale = rng.uniform(0.45, 1.0)
    cw, ch = max(16, int(w * scale)), max(16, int(h * scale * rng.uniform(0.75, 1.25)))
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = source.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    ratio = long_side / max(cw, ch)
    size = (max(8, round(cw * ratio)), max(8, round(ch * ratio)))
    return crop.resize(size, Image.Resampling.BILINEAR)


def random_crop_jpeg(
    rng: random.Random, class_name: str, *, long_side: tuple[int, int] = (300, 640)
) -> bytes:
    """Return the JPEG bytes of one random crop of the photo behind ``class_name``."""
    im = random_crop(rng, photo(class_name), rng.randint(*long_side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=rng.randint(75, 95))
    return buf.getvalue()


def make_example_tree(
    root: str | Path,
    *,
    classes: list[str] | None = None,
    counts: dict[str, int] | None = None,
    long_side: tuple[int, int] = (300, 640),
    png_fraction: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write ``root/{split}/{class}/img_NNNNN.jpg`` (the Keras directory layout).

    Args:
        root: folder to create.
        classes: class names, each one of PHOTOS (default: the first four).
        counts: images per class for each split (default train 60, validation 15, test 15).
        long_side: (min, max) of each image's long side in pixels.
        png_fraction: share of images saved as PNG instead of JPEG.
        seed: all randomness comes from it, so the same call gives the same files.

    Returns:
        The root folder.
    """
    root = Path(root)
    classes = classes or list(PHOTOS)[:4]
    counts = counts or {"train": 60, "validation": 15, "test": 15}
    for split_index, (split, per_class) in enumerate(counts.items()):
        for class_index, name in enumerate(classes):
            rng = random.Random(f"{seed}/{split_index}/{class_index}")
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                if rng.random() < png_fraction:
                    im = random_crop(rng, photo(name), rng.randint(*long_side))
                    im.save(folder / f"img_{i:05d}.png", format="PNG")
                else:
                    (folder / f"img_{i:05d}.jpg").write_bytes(
                        random_crop_jpeg(rng, name, long_side=long_side)
                    )
    return root
