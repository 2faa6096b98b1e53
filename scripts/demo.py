"""End to end: example photos -> shards -> Keras training -> evaluation -> predictions.

Builds a small class-folder tree from the photographs inside scikit-image (4 classes),
packs it with ``packer.pack``, trains a small CNN on ``image_dataset_from_shards``, evaluates
it on the test split, and lines predictions up with file names through an unshuffled
``ShardReader``. Runs in a couple of minutes on 2 CPU cores. Usage::

    python scripts/demo.py [--workdir demo_out] [--epochs 6] [--image-size 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def build_model(image_size: int, num_classes: int):
    """A small CNN: enough to tell four photographs apart, quick on a CPU."""
    import keras

    return keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(num_classes, activation="softmax"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo_out"),
                        help="where data and shards go: its data/ and shards/ are replaced when an "
                             "earlier demo run made them (always in the default demo_out), and "
                             "refused otherwise; nothing else in it is touched")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64, help="square image edge in pixels")
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import keras

    from packer import pack
    from packer.examples import make_example_tree
    from reader import ShardReader, image_dataset_from_shards

    src, shards = args.workdir / "data", args.workdir / "shards"
    mark = args.workdir / ".shardpack-demo"  # says data/ and shards/ are an earlier run's
    ours = mark.exists() or args.workdir == Path("demo_out")  # the default: the demo's own
    if args.workdir.exists() and not args.workdir.is_dir():
        sys.exit(f"{args.workdir} is not a folder: choose another --workdir")
    for made in (src, shards):
        if made.is_symlink():  # writing through it would overwrite whatever it leads to
            sys.exit(f"{made} is a symbolic link: choose another --workdir")
        if os.path.lexists(made) and not ours:
            sys.exit(f"{made} is there and no earlier demo run made it: choose another --workdir")
        if ours and made.is_dir() and not made.is_symlink():
            shutil.rmtree(made)
    args.workdir.mkdir(parents=True, exist_ok=True)
    mark.write_text("made by scripts/demo.py: its data/ and shards/ are replaced on every run\n")
    t = time.perf_counter()
    make_example_tree(
        src,
        classes=["astronaut", "cat", "coffee", "rocket"],
        counts={"train": args.per_class, "validation": max(1, args.per_class // 4),
                "test": max(1, args.per_class // 4)},
        long_side=(96, 192),
        seed=args.seed,
    )
    manifest = pack(src, shards, seed=args.seed, max_count=64, quiet=True)
    counts = {name: split["count"] for name, split in manifest["splits"].items()}
    print(f"packed {counts} into {shards} in {time.perf_counter() - t:.1f} s")

    keras.utils.set_random_seed(args.seed)
    size = (args.image_size, args.image_size)
    opts = dict(image_size=size, batch_size=32, seed=args.seed)
    train = image_dataset_from_shards(shards, split="train", **opts)
    val = image_dataset_from_shards(shards, split="validation", shuffle=False, **opts)
    test = image_dataset_from_shards(shards, split="test", shuffle=False, **opts)
    print(f"classes {train.class_names}; {len(train)} training steps per epoch")

    model = build_model(args.image_size, len(train.class_names))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, validation_data=val, epochs=args.epochs, verbose=2)
    loss, accuracy = model.evaluate(test, verbose=0)
    print(f"test loss {loss:.3f}, test accuracy {accuracy:.3f} (chance {1 / len(train.class_names):.2f})")

    # predictions line up with the unshuffled reader's filenames and labels
    reader = ShardReader(shards, split="test", shuffle=False, **opts)
    predicted = model.predict(test, verbose=0).argmax(axis=1)
    names = reader.class_names
    for path, label, guess in list(zip(reader.filenames, reader.labels, predicted, strict=True))[:8]:
        mark = "ok " if label == guess else "BAD"
        print(f"  {mark} {path:40s} true {names[label]:10s} predicted {names[guess]}")
    print(f"accuracy over {len(predicted)} test images: {np.mean(predicted == reader.labels):.3f}")


if __name__ == "__main__":
    main()
