"""shardpack's packer: class-folder image trees -> class-labelled WebDataset tar shards.

Pipeline: walk -> probe -> plan -> write -> manifest -> upload. Imports no TensorFlow.
"""

from __future__ import annotations

__version__ = "0.4.0"

__all__ = ["pack", "upload", "__version__"]


def __getattr__(name: str):  # lazy: `import packer` stays cheap for workers and the CLI
    if name == "pack":
        from .job import pack

        return pack
    if name == "upload":
        from .uploader import upload

        return upload
    raise AttributeError(f"module 'packer' has no attribute {name!r}")
