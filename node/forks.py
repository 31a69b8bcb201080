"""Fast starts of `potluck` child processes: forks of one process that has imported the heavy packages once.

A `potluck node` spends most of its start importing torch, transformers and hivemind (8 of its 10 s
on a 2-core machine), and a local swarm pays that again for every DHT peer and node it starts. A
``ForkServer`` is one process that imports them once and then forks a child per command line. A
child is a `python -m potluck ARGS` in all but its imports: its own session (and process group), its
own arguments, environment and working directory, its output on the launcher's pipe, stdin from
/dev/null, Python's default signal handlers, and SIGTERM when the fork server goes, which it does
when the launcher closes it or dies. The server reaps its children and reports their exit status.

Only a command whose environment differs from the server's in ``POTLUCK_*`` variables alone (and
pytest's ``PYTEST_*``) can start this way: the preloaded packages read others, e.g. ``HF_HOME`` or
``OMP_NUM_THREADS``, as they are imported. ``start`` returns None for any other, and the caller
starts a plain process.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import IO, NoReturn, Sequence

logger = logging.getLogger(__name__)
PRELOAD = ("potluck.node.server", "potluck.node.bootstrap")  # with every command's module (``_preload``)
REAP_EVERY = 0.05  # seconds between the server's looks for children that exited
MESSAGE_BYTES = 1 << 20
MAY_DIFFER = ("POTLUCK_", "PYTEST_")  # environment variables no preloaded package reads


class Forked:
    """A child of the fork server: the part of ``subprocess.Popen`` a launcher uses."""

    def __init__(self, server: ForkServer, args: list[str], pid: int, stdout: IO[str]):
        self.server, self.args, self.pid, self.stdout = server, args, pid, stdout
        self.returncode: int | None = None  # set by the server's reader: like Popen's, -N for signal N

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.server.exits:
            if not self.server.exits.wait_for(lambda: self.returncode is not None, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet, so the pid is still this child's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """Starts on first use (the imports take as long as one plain start); ``close()`` ends it."""

    def __init__(self, ready_timeout: float = 300):
        self.ready_timeout = ready_timeout
        self.exits = threading.Condition()  # notified when a child's exit status arrives
        self._lock = threading.Lock()  # one start at a time: pids come back in order
        self._pids: list[int] = []  # pids the server sent back, not yet taken
        self._children: dict[int, Forked] = {}
        self._exited: dict[int, int] = {}  # exit status of a child that ended before its start returned
        self._socket: socket.socket | None = None
        self._server: subprocess.Popen | None = None
        self._env: dict[str, str] = {}
        self._failed: str | None = None

    def start(self, args: Sequence[str], env: dict[str, str] | None = None) -> Forked | None:
        """Fork `python -m potluck ARGS` (environment ``env``, default: this process's); None if
        ``env`` differs from the server's in other than ``MAY_DIFFER`` variables, or the server failed."""
        env = dict(os.environ if env is None else env)
        with self._lock:
            if not self._running():
                return None
            if _read_on_import(env) != _read_on_import(self._env):
                return None
            read, write = os.pipe()
            try:
                request = json.dumps({"args": list(args), "env": env, "cwd": os.getcwd()}).encode()
                socket.send_fds(self._socket, [request], [write])
            except OSError as e:
                self._failed = f"the fork server went away ({e})"
            finally:
                os.close(write)
            with self.exits:
                if not self.exits.wait_for(lambda: self._pids or self._failed, 30):
                    self._failed = "the fork server did not answer in 30 s"
                if not self._pids:  # nothing was forked (or it got SIGTERM with the server)
                    os.close(read)
                    logger.warning("%s; starting plain processes instead", self._failed)
                    return None
                child = Forked(self, list(args), self._pids.pop(0),
                               os.fdopen(read, "r", encoding="utf-8", errors="replace"))
                child.returncode = self._exited.pop(child.pid, None)
                if child.returncode is None:
                    self._children[child.pid] = child
            return child

    @property
    def pid(self) -> int | None:
        """The server's process id (None before the first start)."""
        return None if self._server is None else self._server.pid

    def close(self) -> None:
        """End the server; children still running get SIGTERM."""
        if self._socket is not None:
            with contextlib.suppress(OSError):  # wakes our reader (a plain close would not) and tells the server
                self._socket.shutdown(socket.SHUT_RDWR)
            self._socket.close()
        if self._server is not None:
            try:
                self._server.wait(10)
            except subprocess.TimeoutExpired:
                self._server.kill()

    def _running(self) -> bool:
        if self._failed is not None:
            return False
        if self._socket is None:
            self._launch()
        return self._failed is None

    def _launch(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._env = dict(os.environ)
        errors = tempfile.TemporaryFile("w+", errors="replace")  # not a pipe: nobody reads it while all is well
        self._server = subprocess.Popen([sys.executable, "-m", "potluck.node.forks", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], start_new_session=True, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=errors)
        theirs.close()
        self._socket = ours
        ours.settimeout(self.ready_timeout)
        try:
            ready = ours.recv(MESSAGE_BYTES)
        except OSError:
            ready = b""
        if ready != b'{"ready": true}':
            self._server.kill()
            self._server.wait()
            errors.seek(0)
            self._failed = f"the fork server did not start: {errors.read()[-2000:]}"
            logger.warning("%s; starting plain processes instead", self._failed)
            return
        ours.settimeout(None)
        threading.Thread(target=self._read, name="potluck-fork-server", daemon=True).start()
        atexit.register(self.close)

    def _read(self) -> None:
        """Take the server's messages: pids of new children, exit statuses of old ones."""
        while True:
            try:
                data = self._socket.recv(MESSAGE_BYTES)
            except OSError:
                data = b""
            with self.exits:
                if not data:
                    self._failed = self._failed or "the fork server went away"
                    for child in self._children.values():  # they got SIGTERM as it went
                        child.returncode = -signal.SIGTERM
                    self.exits.notify_all()
                    return
                message = json.loads(data)
                if "pid" in message:
                    self._pids.append(message["pid"])
                else:
                    child = self._children.pop(message["exited"], None)
                    if child is not None:
                        child.returncode = message["code"]
                    else:
                        self._exited[message["exited"]] = message["code"]
                self.exits.notify_all()


def _read_on_import(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if not key.startswith(MAY_DIFFER)}


def serve(fd: int) -> None:
    """The server: import, say ready, then fork a child per request until the launcher closes the socket."""
    _preload()
    control = socket.socket(fileno=fd)  # closed when the launcher exits, however it exits
    sys.stdout.flush()
    sys.stderr.flush()
    control.send(b'{"ready": true}')
    running: set[int] = set()
    while True:
        if select.select([control], [], [], REAP_EVERY)[0]:
            data, fds, _, _ = socket.recv_fds(control, MESSAGE_BYTES, 1)
            if not data:
                return  # the launcher is gone: our children get SIGTERM as we exit
            server = os.getpid()
            if (pid := os.fork()) == 0:
                control.close()
                _child(json.loads(data), fds[0], server)
            os.close(fds[0])
            running.add(pid)
            control.send(json.dumps({"pid": pid}).encode())
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                control.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def _preload() -> None:
    import importlib

    from potluck.cli import build_parser
    for module in PRELOAD:
        importlib.import_module(module)
    build_parser()  # imports each command's module


def _child(request: dict, output: int, server: int) -> NoReturn:
    """In a new child: become `python -m potluck ARGS` and exit as it would; never back to the server's loop."""
    code = 1
    try:
        _become(request, output, server)  # exits in run_and_exit, unless main raises
    except SystemExit as e:  # e.g. argparse's --help, --version or usage errors
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        from potluck.cli import exit_now
        exit_now(code)


def _become(request: dict, output: int, server: int) -> NoReturn:
    os.setsid()
    die_with_parent()
    if os.getppid() != server:  # the server went before we asked for its SIGTERM
        os._exit(1)
    _name(f"potluck {request['args'][0] if request['args'] else ''}")  # as top shows it; ps shows the server's line
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(null)
    os.close(output)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    from potluck.cli import run_and_exit
    sys.argv = [os.path.join(os.path.dirname(sys.modules["potluck"].__file__), "__main__.py"), *request["args"]]
    run_and_exit(request["args"])


def _name(name: str) -> None:
    """The process's name, as top shows it (15 bytes)."""
    _prctl(15, name.encode()[:15])  # PR_SET_NAME


def die_with_parent() -> None:
    """SIGTERM when the parent goes."""
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _prctl(option: int, value) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)
    except OSError:  # not Linux
        pass


if __name__ == "__main__":
    serve(int(sys.argv[1]))
    os._exit(0)  # without tearing down the preloaded modules (1.5 s)
