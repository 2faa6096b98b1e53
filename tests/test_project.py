"""Project-level promises: the packer needs no TensorFlow; CI runs README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_packer_runs_without_importing_tensorflow(tmp_path):
    from packer.examples import make_example_tree

    make_example_tree(tmp_path / "src", counts={"train": 3}, long_side=(64, 96))
    code = (
        "import sys; from packer import pack; "
        f"pack({str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, quiet=True, workers=1); "
        # object-store and asyncio support cost a third of the import, and a local pack
        # needs neither
        "assert 'fsspec' not in sys.modules and 'asyncio' not in sys.modules, 'a local pack imported fsspec or asyncio'; "
        "from packer.cli import main; main(['info', %r]); "
        "assert 'tensorflow' not in sys.modules, 'packer imported tensorflow'; "
        "assert 'torch' not in sys.modules, 'packer imported torch'"
    ) % str(tmp_path / "out")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_ci_runs_exactly_the_readme_test_command():
    install_and_demo, install_and_test = _readme_commands()
    assert "scripts/demo.py" in install_and_demo
    assert "pytest" in install_and_test
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install_and_test.strip() in [line.strip() for line in ci]


@pytest.mark.slow
def test_the_demo_replaces_only_what_it_made_in_its_workdir(tmp_path):
    """`scripts/demo.py --workdir DIR` removed DIR and everything in it before starting,
    then DIR/data/ whoever made it (data/ is a common name for one's own images)."""
    demo = [sys.executable, "scripts/demo.py", "--workdir", str(tmp_path), "--epochs", "1",
            "--per-class", "8", "--image-size", "48"]
    root = Path(__file__).parents[1]
    (tmp_path / "results.csv").write_text("mine\n")
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "labels.csv").write_text("mine too\n")
    refused = subprocess.run(demo, capture_output=True, text=True, cwd=root)
    assert refused.returncode != 0 and "no earlier demo run made it" in refused.stderr
    assert (tmp_path / "data" / "raw" / "labels.csv").read_text() == "mine too\n"
    linked = tmp_path / "linked"  # marked as the demo's, but data/ leads to the user's photos
    linked.mkdir()
    (linked / ".shardpack-demo").write_text("")
    (linked / "data").symlink_to(tmp_path / "data")
    refused = subprocess.run([*demo[:3], str(linked), *demo[4:]], capture_output=True, text=True, cwd=root)
    assert refused.returncode != 0 and "is a symbolic link" in refused.stderr
    assert (tmp_path / "data" / "raw" / "labels.csv").read_text() == "mine too\n"
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.csv").write_text("mine\n")
    demo[3] = str(other)
    for _ in range(2):  # the second run replaces the first run's data/ and shards/
        subprocess.run(demo, check=True, capture_output=True, cwd=root)
    assert (other / "results.csv").read_text() == "mine\n"
    assert (other / "shards" / "manifest.json").exists()
