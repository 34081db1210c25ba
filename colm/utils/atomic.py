"""Atomic file writes: a result is either the old file or the complete new one, never half-written."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path next to `path`; renames it onto `path` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
