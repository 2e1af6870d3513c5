"""The lock that the process training a run holds on ``<run dir>/.lock``, and what others read from it: who
trains the run, and whether a run whose summary still says ``running`` was killed without a word (SIGKILL,
out of memory, a node lost). Free of torch, so that the index script starts fast.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: runs cannot be trained there (bnopt.data and bnopt.sweeps need flock), only read
    fcntl = None

LOCK_FILE = ".lock"
CHECKPOINT_FILE = "checkpoint.pt"


class LockHeldError(RuntimeError):
    """Another process holds the lock; the message is the holder line it wrote ("pid 12 on node3")."""


def holder_line() -> str:
    """What the process that holds a run's lock writes in it: which process, on which machine."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


@contextlib.contextmanager
def held(lock: Path, attempts: int = 5, wait_s: float = 0.1) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` for the block, with this process's holder line in it.
    The kernel drops the lock when its holder ends, however it ends. Raises :class:`LockHeldError` when
    another process holds it; tries ``attempts`` times, as a reader asking whether the trainer is gone
    (:func:`trainer_gone`) holds the lock shared for an instant. Where the file system has no locks, the
    block runs unguarded, with a warning."""
    if fcntl is None:
        yield
        return
    with open(lock, "a+", encoding="utf-8") as handle:
        for attempt in range(attempts):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == attempts - 1:
                    handle.seek(0)
                    raise LockHeldError(handle.read().strip() or "another process") from None
                time.sleep(wait_s)
            except OSError as err:  # a file system without locks (some cluster mounts)
                print(f"warning: cannot lock {lock} ({err.strerror}); nothing stops a second process from "
                      "training this run at the same time", file=sys.stderr)
                break
        # Also unlocked: the holder line of a process killed earlier would make the run read as killed.
        handle.truncate(0)
        handle.write(holder_line() + "\n")
        handle.flush()
        yield


def trainer_gone(run_dir: Path) -> bool:
    """Whether the process that ``run_dir``'s lock names (the one that trains, or last trained, the run) has
    ended, as far as this machine can tell: for a holder on this machine, the lock is free (which also holds
    across PID namespaces, and where its PID was reused); where locks cannot be tested, its PID is gone. A
    holder on another machine, or none named, is never taken for gone."""
    lock = run_dir / LOCK_FILE
    try:
        words = lock.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):  # unreadable or damaged: whose it is cannot be told
        return False
    if len(words) != 4 or words[0] != "pid" or words[2] != "on" or words[3] != socket.gethostname():
        return False
    free = _lock_free(lock)
    return free if free is not None else _pid_gone(words[1])


def _lock_free(lock: Path) -> bool | None:
    """Whether no process holds ``lock``; None where that cannot be tested."""
    if fcntl is None:
        return None
    try:
        with open(lock, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True  # released as the file closes
    except BlockingIOError:
        return False
    except OSError:
        return None


def _pid_gone(pid: str) -> bool:
    if os.name != "posix":  # Windows' os.kill ends the process it names, whatever the signal: never ask there
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):  # alive under another user, or not a pid
        return False
    return False


def status_now(run_dir: Path, status: str) -> str:
    """A run's status as its summary gives it, but ``killed`` for one that says ``running`` whose trainer
    is gone."""
    return "killed" if status == "running" and trainer_gone(run_dir) else status


def killed_error(run_dir: Path) -> str:
    """What the index and an unfinished job's record say of a killed run: what happened, and what the same
    command does about it."""
    then = ("resumes it from its last checkpoint" if (run_dir / CHECKPOINT_FILE).exists()
            else "trains it afresh (it wrote no checkpoint)")
    return f"its process ended without a word (the summary says running); the same command {then}"
