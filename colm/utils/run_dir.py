"""The experiment directory of a training run (`exp_out/<exp_name>/`): lock, status marker, resume file.

- `.lock`: held (flock) by the one training process writing the directory; a second run with the same
  exp_name is refused while the first lives. The kernel drops the lock when the process dies, even by SIGKILL.
- `run_status.json`: {"status": "running" | "complete", "step", "num_steps", "best_score", "best_step", ...}.
  "complete" is written after the last checkpoint of the run (finish.pt, best.pt reloaded); a re-run of a
  complete experiment is refused unless `Trainer.overwrite = True`. Downstream scripts warn on a best.pt whose
  directory says "running" (an unfinished or killed run).
- `resume.pt`: the whole training state (colm/procedures/resume.py), rewritten every
  `Trainer.checkpoint_step_interval` steps and deleted once the run is complete.

No module here imports torch: checkpoint scripts use it to look at a directory cheaply.
"""

import errno
import json
import os
import time

from colm.utils.atomic import atomic_path, remove_orphan_temporaries

STATUS_FILE = "run_status.json"
RESUME_FILE = "resume.pt"
LOCK_FILE = ".lock"
RUNNING, COMPLETE = "running", "complete"

_HELD_LOCKS: dict = {}  # realpath of a directory -> open lock file descriptor, for this process


class ExperimentDirError(RuntimeError):
    """A training run may not use this directory (in use, finished, not writable)."""


def read_status(directory: str):
    """The run_status.json dict of `directory`, or None when there is none (or it is unreadable)."""
    path = os.path.join(directory, STATUS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(directory: str, **fields) -> str:
    path = os.path.join(directory, STATUS_FILE)
    status = dict(fields, pid=os.getpid(), updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(status, f, indent=1)
    return path


def finished_reason(directory: str):
    """Why `directory` holds a finished training result (a string), or None when it does not.

    Finished: run_status.json says complete, or (runs older than the marker) finish.pt exists without a
    resume.pt next to it."""
    status = read_status(directory)
    if status is not None:
        if status.get("status") == COMPLETE:
            return f"{os.path.join(directory, STATUS_FILE)} says the run completed ({status.get('updated', '?')})"
        return None
    finish = os.path.join(directory, "finish.pt")
    if os.path.isfile(finish) and not os.path.isfile(os.path.join(directory, RESUME_FILE)):
        return f"{finish} exists (written at the end of a training run)"
    return None


def unfinished_warning(checkpoint_file: str):
    """A warning line when `checkpoint_file` sits in the directory of a training run that has not completed
    (killed, or still running), else None."""
    directory = os.path.dirname(os.path.abspath(checkpoint_file))
    status = read_status(directory)
    if status is None or status.get("status") == COMPLETE:
        return None
    return (f"[colm] WARNING: {checkpoint_file} comes from an unfinished training run ({STATUS_FILE}: "
            f"status {status.get('status')!r} at step {status.get('step')} of {status.get('num_steps')}). Re-run its "
            "training command to finish it (it resumes), or go on knowingly with a partly trained best.pt.")


def check_writable(directory: str, what: str) -> None:
    """Creates `directory` and proves it writable by creating and deleting a file, naming it on failure."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror
        raise ExperimentDirError(f"{what}: cannot write to {directory} ({reason}). Choose another -exp_name or fix "
                                 "the directory's permissions / free disk space; nothing was run.") from error


def acquire_lock(directory: str, what: str) -> None:
    """Takes the directory's lock for this process (again: a no-op) or refuses, naming the holder."""
    import fcntl

    key = os.path.realpath(directory)
    if key in _HELD_LOCKS:
        return
    path = os.path.join(directory, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ExperimentDirError(
                f"{what}: {directory} is in use by another run ({holder}). Two runs with the same exp_name would "
                "interleave their checkpoints: wait for it to end, or choose another -exp_name.") from error
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _HELD_LOCKS[key] = fd


def release_lock(directory: str) -> None:
    import fcntl

    fd = _HELD_LOCKS.pop(os.path.realpath(directory), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def claim(directory: str, what: str) -> list:
    """Everything a training run does before touching `directory`: writable check, lock, removal of the
    temporary files a killed save left. Returns the removed temporaries."""
    check_writable(directory, what)
    acquire_lock(directory, what)
    return remove_orphan_temporaries(directory)
