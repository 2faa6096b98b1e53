"""The ``shardpack`` command: exit statuses, messages and output of pack / info / verify."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from zoo import SMALL

from packer.cli import main
from packer.examples import make_example_tree
from packer.format import MANIFEST_NAME

SHARDPACK = str(Path(sys.executable).with_name("shardpack"))


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    return make_example_tree(root / "src", classes=["cat", "coffee"], counts={"train": 10, "test": 3},
                             long_side=SMALL, seed=4)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_pack_info_verify(src, tmp_path, capsys):
    out = str(tmp_path / "out")
    status, text, _ = run(capsys, "pack", str(src), out, "--max-count", "4", "--workers", "1", "--quiet")
    assert status == 0
    assert text.startswith(f"packed 26 images of 2 classes into {out}; skipped 0")
    assert "train: 20 images in 5 shards" in text

    status, text, _ = run(capsys, "info", out)
    assert status == 0 and "classes (2): cat, coffee" in text and "cat 10, coffee 10" in text
    status, text, _ = run(capsys, "info", out, "--json")
    assert status == 0
    assert json.loads(text)["splits"]["test"]["count"] == 6
    assert json.loads(text)["classes"] == json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["classes"]

    status, text, err = run(capsys, "verify", out, "--deep", "--quiet")
    assert status == 0 and "verify OK: 7 shards, 26 samples checked, 26 images decoded" in text

    shard = tmp_path / "out" / "train" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x10
    shard.write_bytes(bytes(data))
    status, text, err = run(capsys, "verify", out, "--quiet")
    assert status == 1 and "FAILED" in text and "train/train-000001.tar" in err


def test_console_script_exit_codes(src, tmp_path):
    out = tmp_path / "out"
    base = [SHARDPACK, "pack", str(src), str(out), "--workers", "1", "--quiet"]
    assert subprocess.run(base + ["--max-count", "4"], capture_output=True).returncode == 0
    refused = subprocess.run(base + ["--max-count", "5"], capture_output=True, text=True)
    assert refused.returncode == 2 and "different options (max_count)" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert subprocess.run(base + ["--max-count", "5", "--overwrite"], capture_output=True).returncode == 0
    verified = subprocess.run([SHARDPACK, "verify", str(out), "--quiet"], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr


def test_flat_tree_without_validation_split(src, tmp_path, capsys):
    flat = tmp_path / "flat"
    shutil.copytree(src / "train", flat)
    status, _, err = run(capsys, "pack", str(flat), str(tmp_path / "out"), "--workers", "1", "--quiet")
    assert status == 2 and "--validation-split" in err and "no class folders" in err
    status, text, _ = run(capsys, "pack", str(flat), str(tmp_path / "out"), "--workers", "1", "--quiet",
                          "--validation-split", "0.3", "--seed", "7")
    assert status == 0 and "validation: 6 images" in text and "train: 14 images" in text


@pytest.mark.parametrize("args, words", [
    (["--max-size", "12XB"], "cannot read size"),
    (["--max-count", "0"], "max_count"),
    (["--validation-split", "1.5"], "validation_split"),
    (["--resize", "huge"], "--resize"),
    (["--resize", "0"], "--resize must be positive"),  # was taken for "no resize"
    (["--layout", "splits", "--validation-split", "0.2"], "flat"),
    (["--quality", "500"], "quality"),
    (["--quality", "0"], "quality"),
    (["--resize", "64", "--quality", "0"], "quality must be in 1..100"),
    (["--quality", "90"], "--quality 90 applies only to images re-encoded by --resize"),
    (["--scheduler", "tcp://127.0.0.1:1"], "Add --engine dask, or drop --scheduler"),
    (["--workers", "-1"], "workers"),
    (["--max-pixels", "0"], "max_pixels"),
])
def test_bad_options_exit_2(src, tmp_path, capsys, args, words):
    status, _, err = run(capsys, "pack", str(src), str(tmp_path / "out"), "--quiet", *args)
    assert status == 2 and words in err
    assert not (tmp_path / "out").exists()


def test_info_tells_resized_shards_from_originals_and_repeats_the_packs_warnings(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "pack", str(src), str(out), "--resize", "24", "--quality", "80", "--workers", "1",
               "--quiet")[0] == 0
    text = run(capsys, "info", str(out))[1]
    assert "packed with: --resize 24 (short side; JPEG quality 80); seed 0" in text
    assert "warnings" not in text
    lookalikes = tmp_path / "lookalikes"
    shutil.copytree(src, lookalikes)
    shutil.copytree(lookalikes / "train" / "cat", lookalikes / "train" / "Cat")
    assert run(capsys, "pack", str(lookalikes), str(tmp_path / "out2"), "--workers", "1", "--quiet")[0] == 0
    text = run(capsys, "info", str(tmp_path / "out2"))[1]
    assert "packed with: original image bytes (no --resize)" in text
    assert "warnings (1), as the pack gave them:" in text and "'Cat'" in text


def test_a_mistyped_option_shows_the_commands_usage_and_v_goes_after_it_too(capsys):
    from packer.cli import build_parser

    with pytest.raises(SystemExit) as info:
        main(["info", "shards", "--jsn"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: shardpack info" in err and "--jsn" in err
    for argv, verbose in ((["info", "x"], False), (["info", "x", "-v"], True), (["-v", "info", "x"], True),
                          (["pack", "a", "b", "--verbose"], True)):
        assert build_parser().parse_known_args(argv)[0].verbose is verbose, argv


def test_info_and_verify_without_manifest(tmp_path, capsys):
    status, _, err = run(capsys, "info", str(tmp_path))
    assert status == 2 and "no manifest.json" in err
    status, _, err = run(capsys, "verify", str(tmp_path), "--quiet")
    assert status == 1 and "no manifest.json" in err


def test_bench_refuses_a_bad_source_before_starting_contenders_and_warns_on_a_small_split(
        id_shards, tmp_path, capsys):
    for argv, words in (([str(tmp_path)], "no manifest.json"),
                        ([str(id_shards[0]), "--split", "val"], "available splits")):
        assert main(["bench", *argv]) == 2
        out, err = capsys.readouterr()
        assert words in err and "round 1" not in out  # no contender process was started
    assert main(["bench", str(id_shards[0]), "--image-size", "16", "--batch-size", "64",
                 "--repeat", "1", "--only", "decode_limit"]) == 0
    assert "holds 210 images, under 5 batches of 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text and "(default: train)" in text


def test_bench_owns_its_options_and_measures_a_shard_set(id_shards, capsys):
    """`shardpack bench --help` and options before SOURCE reach reader.benchmark's parser, and
    a real (small) run reports the reader next to the decode limit."""
    for global_options in ([], ["-v"]):  # the global -v before the command too
        with pytest.raises(SystemExit) as info:
            main([*global_options, "bench", "--help"])
        assert info.value.code == 0 and "--image-size" in capsys.readouterr().out
    assert main(["bench", "--split", "train", "--image-size", "16", "--batch-size", "8",
                 "--repeat", "1", "--only", "decode_limit,shardpack_numpy", str(id_shards[0])]) == 0
    out = capsys.readouterr().out
    assert "decode_limit" in out and "shardpack_numpy" in out and "error" not in out
    row = next(line for line in out.splitlines() if line.startswith("| shardpack_numpy "))
    assert row.split(" | ")[4].isdigit()  # the whole epoch's rate beside the steady one
    assert main(["bench", "--image-size", "16", "--batch-size", "8", "--repeat", "1",
                 "--only", "shardpack_numpy", "--processes", "2", str(id_shards[0])]) == 0
    assert "error" not in capsys.readouterr().out
    # --cache cold: the shards leave the page cache before every epoch (tests/test_bench_script
    # checks that with the kernel); a URL has no local files to evict, which is refused, as is
    # a platform without posix_fadvise
    cold = ["bench", "--image-size", "16", "--batch-size", "8", "--repeat", "1",
            "--only", "shardpack_numpy", "--cache", "cold", str(id_shards[0])]
    if hasattr(os, "posix_fadvise"):
        assert main(cold) == 0
        out = capsys.readouterr().out
        assert "cold page cache" in out and "error" not in out
    with pytest.raises(SystemExit) as info:
        main([*cold[:-1], "s3://bucket/shards"] if hasattr(os, "posix_fadvise") else cold)
    words = "SOURCE must be a local folder" if hasattr(os, "posix_fadvise") else "lacks (Linux has it)"
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_out_that_is_src_or_holds_it_is_refused(src, tmp_path, capsys):
    """`pack data data --overwrite` wrote shards among the images it packed; OUT must be
    neither SRC (under any spelling) nor a folder SRC lies in. Nothing is written."""
    tree = tmp_path / "data"
    shutil.copytree(src, tree)
    before = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*"))
    (tmp_path / "alias").symlink_to(tree)
    for out in (tree, tmp_path / "alias", Path(f"{tree}/train/..")):
        for extra in ([], ["--overwrite"]):
            status, _, err = run(capsys, "pack", str(tree), str(out), "--workers", "1", "--quiet", *extra)
            assert status == 2 and "SRC and OUT are the same folder" in err and "Traceback" not in err
    status, _, err = run(capsys, "pack", str(tree), str(tmp_path), "--workers", "1", "--quiet", "--overwrite")
    assert status == 2 and f"SRC {tree} lies inside OUT" in err
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*")) == before
    assert not (tmp_path / "train").exists() and not (tmp_path / MANIFEST_NAME).exists()
    status, _, _ = run(capsys, "pack", str(tree), str(tree / "shards"), "--workers", "1", "--quiet")
    assert status == 0  # OUT inside SRC stays legitimate


def test_a_tree_without_images_is_refused_and_writes_nothing(tmp_path, capsys, caplog):
    """Class folders but no images packed "0 images" (exit 0) and readers failed later; now
    the pack is refused (exit 2) and OUT is neither created nor, if it held a pack, changed.
    A tree where only some splits are empty still packs, with a warning."""
    from conftest import write_id_tree

    src = tmp_path / "src"
    for rel in ("train/cat", "train/dog", "test/cat"):
        (src / rel).mkdir(parents=True)
    (src / "train" / "cat" / "notes.txt").write_text("no image")
    (src / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    status, _, err = run(capsys, "pack", str(src), str(tmp_path / "out"), "--workers", "1", "--quiet")
    assert status == 2 and "no images found to pack" in err and "train/dog/broken.jpg" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    good = tmp_path / "good"
    write_id_tree(good, {"train": 2})
    assert run(capsys, "pack", str(good), str(tmp_path / "old"), "--workers", "1", "--quiet")[0] == 0
    published = (tmp_path / "old" / MANIFEST_NAME).read_bytes()
    status, _, err = run(capsys, "pack", str(src), str(tmp_path / "old"), "--workers", "1", "--quiet",
                         "--overwrite")
    assert status == 2 and (tmp_path / "old" / MANIFEST_NAME).read_bytes() == published
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [MANIFEST_NAME, "train"]
    write_id_tree(src, {"train": 2})
    status, text, err = run(capsys, "pack", str(src), str(tmp_path / "out"), "--workers", "1", "--quiet")
    assert status == 0 and "test: 0 images" in text and "split 'test' holds no images" in caplog.text
    assert "split 'test' holds no images" in " ".join(
        json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["warnings"])


@pytest.mark.parametrize("bad", [["--image-size", "0"], ["--batch-size", "0"], ["--repeat", "0"],
                                 ["--processes", "-1"], ["--epochs", "0"], ["--warmup", "-1"],
                                 ["--image-size", "x"]])
def test_bench_refuses_bad_numbers_before_starting_contenders(id_shards, capsys, bad):
    """Each ran every contender in every round to fail each (an OpenCV assertion for a 0
    size), or "measured" 0-image batches; now argparse says which option and why."""
    with pytest.raises(SystemExit) as info:
        main(["bench", str(id_shards[0]), "--only", "decode_limit", *bad])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and bad[0] in err and "round 1" not in out


def test_files_a_command_cannot_write_are_one_line_errors(id_shards, tmp_path, capsys):
    """preview --out naming a folder, or under a file; bench --json under a file (found
    only after the whole benchmark had run): tracebacks before, exit 2 and one line now."""
    shards, _ = id_shards
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path, tmp_path / "afile" / "grid.png"):
        status, _, err = run(capsys, "preview", str(shards), "--split", "test", "--out", str(out))
        assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as info:
        main(["bench", str(shards), "--only", "decode_limit", "--json", str(tmp_path / "afile" / "x.json"), "-v"])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and "is not a folder" in err and "round 1" not in out


def test_info_json_into_a_pipe_closed_early_ends_quietly(id_shards):
    """`shardpack info OUT --json | head`: the reader of the pipe goes away; it ended in a
    BrokenPipeError traceback. (The pipe is made small, so the manifest fills it.)"""
    import fcntl

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    child = subprocess.Popen([sys.executable, "-m", "packer.cli", "info", str(id_shards[0]), "--json"],
                             stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    assert os.read(read_end, 1) == b"{"
    os.close(read_end)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 1 and b"Traceback" not in err, err.decode()
