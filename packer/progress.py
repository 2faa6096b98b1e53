"""Progress bars for the packer: tqdm without its monitor thread.

tqdm starts a background "monitor" thread with the first bar and leaves it running. A
process with other threads must not ``fork`` (a child could inherit a lock that thread
held, such as stderr's while it redraws a bar), so with the monitor alive every later
pack in the process had to start its workers with the slower ``forkserver``. Our bars
update often enough not to need it.
"""

from __future__ import annotations

import warnings

from tqdm.std import TqdmExperimentalWarning

with warnings.catch_warnings():  # as tqdm.auto does: "notebook mode" is what we want there
    warnings.simplefilter("ignore", category=TqdmExperimentalWarning)
    # tqdm.auto without its asyncio part (we never iterate bars asynchronously), whose
    # import cost ~20 ms in every command and every packer process
    from tqdm.autonotebook import tqdm

__all__ = ["Progress"]


class Progress(tqdm):  # type: ignore[type-arg,misc]
    """tqdm (a notebook widget in Jupyter, text elsewhere) that never starts the monitor
    thread."""

    monitor_interval = 0
