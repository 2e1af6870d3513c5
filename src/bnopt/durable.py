"""Writes that a crash cannot leave half done: a file is the old one or the new one, never an empty one.
Free of Hydra and OmegaConf, so that ``bnopt.probes`` (whose activation recorder saves with it) imports
without them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` in UTF-8, as every text file of a run (and Hydra's ``.hydra/``) is written and read
    whatever the locale: a run made on one machine is read on another."""
    write_durably(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_durably(path: Path, write: Callable[[Path], object], tmp: Path | None = None) -> None:
    """``write(tmp)``, then ``tmp`` moved onto ``path`` (:func:`replace_durably`); ``tmp`` is ``path`` with
    ``.tmp`` added unless given. A write that fails (a full disk, a quota) removes ``tmp`` and leaves ``path``
    as it was: a checkpoint cut short by a full disk left a file as large as the model, which took the room
    that the run's summary then needed to say why it stopped."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_durably(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)`` with ``tmp``'s data on disk first and the rename after: a node that crashes
    then leaves the old file or the new one, not an empty one (a rename may reach the disk before the data)."""
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # a platform or file system that cannot open a directory: the rename is as durable as it gets
    try:
        os.fsync(handle)
    except OSError:
        pass  # some network file systems refuse to sync a directory
    finally:
        os.close(handle)
