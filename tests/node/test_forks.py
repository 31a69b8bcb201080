"""The fork server's children behave as `python -m potluck` processes: arguments, output, exit
status, environment, working directory, signals, their own session; and they end with the server."""
import os
import signal
import subprocess
import time

import psutil
import pytest

from potluck import __version__
from potluck.node.forks import ForkServer


@pytest.fixture(scope="module")
def server():
    forks = ForkServer()
    yield forks
    forks.close()


def line_with(child, text: str) -> str:
    for line in child.stdout:
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r}; exit status {child.wait(10)}")


def test_a_child_runs_its_command_line_and_exits_as_it_does(server):
    version = server.start(["--version"])
    assert version.stdout.read().strip() == f"potluck {__version__}"
    assert version.wait(30) == 0
    refused = server.start(["route", "--initial-peers", "127.0.0.1:37677"])
    last = refused.stdout.read().strip().splitlines()[-1]  # stderr comes on the same pipe
    assert last.startswith("potluck route:") and "'127.0.0.1:37677'" in last and "Traceback" not in last, last
    assert refused.wait(30) == 2
    unknown = server.start(["no-such-command"])
    assert "invalid choice: 'no-such-command'" in unknown.stdout.read()
    assert unknown.wait(30) == 2


def test_a_child_takes_the_environment_and_directory_of_its_start(server, monkeypatch, tmp_path):
    monkeypatch.setenv("POTLUCK_INITIAL_PEERS", "10.0.0.1:1")
    monkeypatch.chdir(tmp_path)
    refused = server.start(["route"])
    assert "'10.0.0.1:1'" in refused.stdout.read()
    assert refused.wait(30) == 2
    monkeypatch.delenv("POTLUCK_INITIAL_PEERS")
    dht = server.start(["dht", "--identity-path", "here.key"])
    try:
        line_with(dht, "POTLUCK_INITIAL_PEERS=")
        assert (tmp_path / "here.key").exists()  # relative to the directory it was started from
        assert os.getsid(dht.pid) == dht.pid  # a session of its own: a terminal's Ctrl-C is not its
        assert psutil.Process(dht.pid).ppid() == server.pid
        assert dht.pid in {p.pid for p in psutil.Process().children(recursive=True)}
        dht.send_signal(signal.SIGINT)  # graceful, as a plain process
        assert dht.wait(30) == 0
    finally:
        dht.kill()


def test_an_environment_the_preloaded_packages_read_gets_a_plain_process(server, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert server.start(["--version"]) is None


def test_a_killed_child_reports_the_signal_and_the_server_serves_on(server):
    dht = server.start(["dht"])
    line_with(dht, "POTLUCK_INITIAL_PEERS=")
    with pytest.raises(subprocess.TimeoutExpired):
        dht.wait(0.2)
    dht.kill()
    assert dht.wait(30) == -signal.SIGKILL
    assert server.start(["--version"]).wait(30) == 0


def test_children_end_with_their_server():
    forks = ForkServer()
    dht = forks.start(["dht"])
    line_with(dht, "POTLUCK_INITIAL_PEERS=")
    forks.close()
    assert forks._server.returncode == 0  # it heard the close and left, not killed after close's wait
    assert dht.wait(30) == -signal.SIGTERM
    assert gone(dht.pid)  # not left running


def gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_a_server_that_does_not_come_up_starts_nothing():
    forks = ForkServer(ready_timeout=0.01)  # imports take seconds
    assert forks.start(["--version"]) is None
