"""Shared fixtures: real image trees packed into real shards (no committed files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

# Property tests draw the same examples on every run unless HYPOTHESIS_PROFILE=explore: CI
# must not pass or fail by the luck of the draw (a header-truncation case once did); run
# the explore profile locally to search further.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def cpus_from_environment():
    """``SHARDPACK_TEST_CPUS=16 pytest`` runs the suite as a machine of 16 CPUs would: the
    readers' CPU count (decode threads, and ``processes="auto"``, the default, which takes
    decode processes from 8 CPUs on) is that number. CI runs on whatever it is given; this
    shows here what a many-core CI would meet. Tests that fake a CPU count of their own
    still do."""
    cpus = os.environ.get("SHARDPACK_TEST_CPUS")
    if not cpus:
        yield
        return
    import reader.shard_reader as shard_reader

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard_reader, "_default_workers", lambda: int(cpus))
        yield

def write_jpeg_tars(folder: Path, *, count: int, classes: int, broken: set[int], per_tar: int,
                    max_side: int, seed: int) -> str:
    """``count`` JPEGs of random sizes (20 to ``max_side`` px) and colours written straight
    into webdataset tars of ``per_tar`` samples (no manifest), keys ``s0000...``, class
    ``n % classes``; the samples in ``broken`` hold bytes no decoder reads. Returns the
    brace pattern of the tars."""
    import io
    import random

    import webdataset as wds

    rng = random.Random(seed)
    with wds.ShardWriter(str(folder / "b-%06d.tar"), maxcount=per_tar, verbose=0) as sink:
        for n in range(count):
            im = Image.new("RGB", (rng.randint(20, max_side), rng.randint(20, max_side)),
                           tuple(rng.randrange(256) for _ in range(3)))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"s{n:04d}", "jpg": b"\xff\xd8 broken" if n in broken else buf.getvalue(),
                        "cls": n % classes})
    return str(folder / f"b-{{000000..{(count - 1) // per_tar:06d}}}.tar")


def write_id_tars(folder: Path, count: int, broken: set[int], per_tar: int) -> str:
    """``count`` 16x16 PNGs coded as ``sample_ids`` reads them, written straight into
    webdataset tars of ``per_tar`` (no manifest, 3 classes: ``n % 3``); the samples in
    ``broken`` hold bytes no decoder reads. Returns the brace pattern of the tars."""
    import io

    import webdataset as wds

    with wds.ShardWriter(str(folder / "f-%06d.tar"), maxcount=per_tar, verbose=0) as sink:
        for n in range(count):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (n % 256, n // 256, 0)).save(buf, format="PNG")
            sink.write({"__key__": f"s{n:04d}", "png": b"\x89PNG broken" if n in broken else buf.getvalue(),
                        "cls": n % 3})
    return str(folder / f"f-{{000000..{(count - 1) // per_tar:06d}}}.tar")


# ---- reader fixtures (issue #3) ----------------------------------------------------------

# Images whose pixels say who they are: every pixel of sample n (n counted over the whole
# tree) is (n % 256, n // 256, 40 * class index), so a decoded batch can be checked sample
# by sample against the manifest, with no bookkeeping beside the pixels.
ID_CLASSES = ["circle", "square", "triangle"]


def write_id_tree(root: Path, counts: dict[str, int], *, size: int = 8) -> dict[int, str]:
    """Write ``root/{split}/{class}/img_N.png``; return sample id -> relative path."""
    paths = {}
    n = 0
    for split, per_class in counts.items():
        for c, name in enumerate(ID_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (n % 256, n // 256, 40 * c)).save(folder / f"img_{i:04d}.png")
                paths[n] = f"{split}/{name}/img_{i:04d}.png"
                n += 1
    return paths


def pixel_ids(x) -> list[int]:
    """Sample ids encoded in a decoded batch by write_id_tree."""
    px = np.rint(np.asarray(x[:, 0, 0, :], dtype=np.float64)).astype(int)  # float32 rows may be unrounded
    return [int(r + 256 * g) for r, g, _ in px]


@pytest.fixture(scope="session")
def id_shards(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """Shards of id-coded images: train 3x70 samples in shards of 16, test 3x10."""
    from packer import pack

    root = tmp_path_factory.mktemp("id_tree")
    paths = write_id_tree(root / "src", {"train": 70, "test": 10})
    pack(root / "src", root / "shards", seed=0, max_count=16, workers=1, quiet=True)
    return root / "shards", paths


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> Path:
    """Shards of realistic photos (packer.examples): 4 classes, small images."""
    from packer import pack
    from packer.examples import make_example_tree

    root = tmp_path_factory.mktemp("photo_tree")
    make_example_tree(
        root / "src",
        counts={"train": 80, "validation": 20, "test": 20},
        long_side=(64, 128),
        seed=0,
    )
    pack(root / "src", root / "shards", seed=0, max_count=40, workers=1, quiet=True)
    return root / "shards"


# ---- object storage fixtures (issue #5) ---------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto) on 127.0.0.1, for the whole session."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from s3_server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """``(endpoint, storage_options, bucket)``: a fresh bucket on the loopback S3 server,
    dummy credentials in the environment, nothing outside 127.0.0.1."""
    import uuid

    import fsspec
    from s3_server import s3_options

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-do-not-print")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    options = s3_options(s3_server.endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    fs.mkdir(bucket)
    return s3_server.endpoint, options, bucket


# ---- distributed reading and resume (issue #6) ------------------------------------------


def batches_and_states(reader) -> tuple[list[list[int]], list[dict]]:
    """The sample ids of each batch of the reader's next epoch, and its state (through
    JSON, as a checkpoint keeps it) after each."""
    import json

    got, states = [], []
    for batch in reader:
        got.append(sample_ids(batch[0] if isinstance(batch, tuple) else batch))
        states.append(json.loads(json.dumps(reader.state_dict())))
    return got, states


def sample_ids(x) -> list[int]:
    """Sample ids encoded by write_awkward_tree in a decoded NHWC batch (numpy or torch)."""
    import numpy as np

    px = np.rint(np.asarray(x)[:, 0, 0, :]).astype(int)
    return [int(r + 256 * g) for r, g, _ in px]


@pytest.fixture(scope="session")
def awkward_shards(tmp_path_factory) -> Path:
    """Awkward sizes: train 1,001 id-coded 16x16 images in 7 shards (6 x 150 + 101), "small"
    10 images in 1 shard. Pixels (id % 256, id // 256, 0) as in write_id_tree."""
    from packer import pack

    root = tmp_path_factory.mktemp("awkward")
    n = 0
    for split, per_class in {"train": (334, 334, 333), "small": (3, 3, 4)}.items():
        for name, count in zip(ID_CLASSES, per_class, strict=True):
            folder = root / "src" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (16, 16), (n % 256, n // 256, 0)).save(folder / f"i{i:04d}.png")
                n += 1
    pack(root / "src", root / "shards", seed=0, max_count=150, workers=1, quiet=True)
    return root / "shards"


def small_cnn(keras, *, image_size: tuple[int, int] = (32, 32), classes: int = 4):
    """The small compiled CNN the Keras end-to-end tests train (labels are int)."""
    model = keras.Sequential([
        keras.Input((*image_size, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def no_delete_store(protocol: str) -> str:
    """Register an in-memory fsspec store under ``protocol`` that denies every delete, as
    S3 denies a role without s3:DeleteObject (s3fs raises PermissionError); return the
    protocol. Each test names its own, so their objects stay apart."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class NoDelete(MemoryFileSystem):
        root_marker = "/"

        def rm_file(self, path, *args, **kwargs):
            raise PermissionError(f"AccessDenied: DeleteObject {path}")

    NoDelete.protocol = (protocol,)
    fsspec.register_implementation(protocol, NoDelete, clobber=True)
    return protocol
