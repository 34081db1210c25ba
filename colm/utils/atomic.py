"""Atomic file writes: a result is either the old file or the complete new one, never half-written.

`atomic_path(path)` yields a temporary `.tmp-<name>-XXXX` next to `path`; when the block succeeds the file
and then its directory are fsynced around the rename, so a power cut or a killed job never leaves a renamed
but empty file. A process killed inside the block (SIGKILL runs no cleanup) leaves its temporary file
behind; `remove_orphan_temporaries` deletes those (the Trainer calls it under the experiment lock).
A full disk is reported as ENOSPC naming the file, with the previous version untouched.
"""

import contextlib
import errno
import glob
import os
import shutil
import tempfile

TMP_PREFIX = ".tmp-"
_LOW_SPACE_BYTES = 1 << 20  # a write that fails with less than this free is blamed on the full disk


def fsync_directory(directory: str) -> None:
    """Makes a rename in `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(error: BaseException, directory: str) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    # torch.save reports a failed write as a RuntimeError ("file write failed") without the errno.
    if isinstance(error, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(directory).free < _LOW_SPACE_BYTES
        except OSError:
            return False
    return False


def _disk_full_error(path, directory):
    return OSError(errno.ENOSPC, f"No space left on device while writing {path} (free some space on the disk holding "
                                 f"{directory}; the previous {os.path.basename(path)}, if any, is untouched)", path)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path next to `path`; renames it onto `path` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-", dir=directory)
    except OSError as error:
        if _disk_full(error, directory):
            raise _disk_full_error(path, directory) from error
        raise
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates the file as 0600; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_directory(directory)
    except BaseException as error:
        if _disk_full(error, directory):
            raise _disk_full_error(path, directory) from error
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_orphan_temporaries(directory: str) -> list:
    """Deletes the `.tmp-*` files `atomic_path` left in `directory` when a process was killed mid-save.

    Only call it while no other process can be writing there (the Trainer holds the experiment lock).
    Returns the removed paths."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*"))):
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed
