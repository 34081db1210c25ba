"""A preloaded Python: run many short colm commands without paying torch's and transformers' imports each time.

Every launcher starts a new Python that spends several seconds importing torch and transformers before it does
anything; the quickstart runs about fifty such commands. A server started once imports them (`serve`), then
forks a child for each request, so each command starts from a process that has imported everything and done
nothing else: no gin config, no model, no seeds set. A request comes from the client (`run`), which hands the
server its argv, environment, working directory and its stdin/stdout/stderr, forwards Ctrl-C and SIGTERM to
the child, and exits with the child's status. Results are those of a fresh process.

    python -m colm.utils.preloaded serve SOCKET           # the server (StageRunner starts and stops it)
    python -m colm.utils.preloaded run -- -m colm.main ... # what `python -m colm.main ...` would run
    python -m colm.utils.preloaded run -- scripts/x.py ... # what `python scripts/x.py ...` would run

The launchers use the client when COLM_PRELOADED names a server's socket. The client runs the command itself
(exec, as if the server did not exist) when the server is unreachable or was started with a different
interpreter or different values of the variables in SAME_ENV, which take effect at import time.

This module imports only the standard library, so that the client starts in milliseconds.
"""

import json
import os
import runpy
import signal
import socket
import struct
import sys
import traceback

PRELOAD = ("colm.configurables",)  # imports torch, transformers and every colm configurable
# Variables read when torch or transformers are imported (thread pools, kernels, devices) or that decide what
# is imported: a server started with other values cannot stand in for a fresh process.
SAME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "CUDA_VISIBLE_DEVICES",
            "PYTHONPATH", "PYTHONHASHSEED", "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME")
_HEADER = struct.Struct("!Q")  # length of the JSON request that follows


def _identity(env) -> dict:
    return {"python": sys.executable, **{k: env.get(k) for k in SAME_ENV}}


def _read_exactly(conn, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the connection closed mid-request")
        data += chunk
    return data


def _send(conn, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


# ----- server -------------------------------------------------------------------------------------------------
def _warm_up() -> None:
    """Imports everything a colm command imports, including the model classes transformers loads lazily."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import transformers

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForSeq2SeqLM", "AutoModelForCausalLM",
                 "T5ForConditionalGeneration", "LlamaForCausalLM", "GPT2LMHeadModel", "PreTrainedTokenizerFast"):
        getattr(transformers, name)


def serve(path: str) -> None:
    _warm_up()
    identity = _identity(os.environ)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.replace(path + ".tmp", path)  # the socket appears only once the server is ready
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished children are reaped by the kernel
    while True:
        conn, _ = listener.accept()
        try:
            head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
            request = json.loads(_read_exactly(conn, _HEADER.unpack(head)[0]).decode())
        except (OSError, ValueError, struct.error):
            conn.close()
            continue
        mismatch = {k: (v, _identity(request["env"])[k]) for k, v in identity.items()
                    if _identity(request["env"])[k] != v}
        if mismatch or request.get("python") != sys.executable:
            _send(conn, {"refused": f"started with other settings: {mismatch}"})
        elif os.fork() == 0:
            listener.close()
            _child(conn, fds, request)  # never returns
        for fd in fds:
            os.close(fd)
        conn.close()


def _child(conn, fds, request) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the command may wait for its own children
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _send(conn, {"pid": os.getpid()})
    code = _run_program(request["argv"])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        _send(conn, {"exit": code})
    except OSError:
        pass
    os._exit(code)


def _run_program(argv) -> int:
    """Runs `python ARGV` in this process, as the interpreter would: `-m module args` or `script args`."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1]] + list(argv[2:])
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as stop:
        if stop.code is None:
            return 0
        if isinstance(stop.code, int):
            return stop.code
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1


class Server:
    """A preloaded server for the commands of one pipeline: `with Server() as env_value:` starts it (its imports
    take a few seconds, once) and gives the COLM_PRELOADED value for the commands' environment; leaving the
    block stops it. Started with this process's environment, which the commands must share (SAME_ENV)."""

    def __init__(self, env=None):
        import subprocess
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="colm_preloaded_")  # outside the tree: a socket, removed at the end
        self.path = os.path.join(self.folder, "socket")
        self.process = subprocess.Popen([sys.executable, "-m", "colm.utils.preloaded", "serve", self.path],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout=300.0) -> str:
        import time

        deadline = time.time() + timeout
        while not os.path.exists(self.path):
            if self.process.poll() is not None:
                raise RuntimeError("the preloaded Python did not start:\n" + self.process.stderr.read().decode())
            if time.time() > deadline:
                raise RuntimeError(f"the preloaded Python did not start within {timeout:.0f} s")
            time.sleep(0.05)
        return self.path

    def close(self) -> None:
        import shutil

        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self.wait_ready()

    def __exit__(self, *exc):
        self.close()


# ----- client -------------------------------------------------------------------------------------------------
def _open_or_null(fd: int) -> int:
    """fd itself, or /dev/null where this process has no such descriptor (a closed stdin)."""
    try:
        os.fstat(fd)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


def _exec_directly(argv):
    os.execv(sys.executable, [sys.executable] + list(argv))


def run(argv, path=None) -> int:
    path = path or os.environ.get("COLM_PRELOADED")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except (OSError, TypeError):
        _exec_directly(argv)
    body = json.dumps({"argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd(),
                       "python": sys.executable}).encode()
    socket.send_fds(conn, [_HEADER.pack(len(body))], [_open_or_null(fd) for fd in (0, 1, 2)])
    conn.sendall(body)
    replies = conn.makefile("r")
    first = json.loads(replies.readline() or "{}")
    if "pid" not in first:  # refused, or the server went away
        conn.close()
        _exec_directly(argv)
    pid = first["pid"]

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    line = replies.readline()
    if not line:  # the child died without reporting (killed by a signal)
        print(f"[colm] the command (pid {pid}) ended without an exit status; it was killed.", file=sys.stderr)
        return 137
    return int(json.loads(line)["exit"])


def main(args=None) -> int:
    args = sys.argv[1:] if args is None else args
    if len(args) == 2 and args[0] == "serve":
        serve(args[1])
        return 0
    if len(args) >= 3 and args[0] == "run" and args[1] == "--":
        return run(args[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
