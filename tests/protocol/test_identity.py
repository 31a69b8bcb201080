"""A peer's key file: made, kept, locked to one process, and refused by name when unusable."""
import logging
import subprocess
import sys

import pytest

from potluck.protocol import identity
from potluck.protocol.errors import BadRequest
from potluck.protocol.identity import identity_path
from potluck.protocol.signing import load_identity

HOLD = """import sys
from potluck.protocol.identity import identity_path
identity_path(sys.argv[1], "x", "--identity-path")
print("held", flush=True)
sys.stdin.read()
"""


def test_a_missing_identity_path_is_made_and_stays_this_process_own(tmp_path):
    path = tmp_path / "mine.key"
    assert identity_path(str(path), "x", "--identity-path") == str(path)
    load_identity(str(path))
    assert identity_path(str(path), "x", "--identity-path") == str(path)  # a second call here: the same key


def test_an_identity_path_another_process_holds_is_refused_by_name(tmp_path):
    path = tmp_path / "shared.key"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BadRequest, match="--identity-path .*another process on this machine uses this key"):
            identity_path(str(path), "x", "--identity-path")
    finally:
        holder.communicate("", timeout=30)
    assert identity_path(str(path), "x", "--identity-path") == str(path)  # free once it exited


@pytest.mark.parametrize("content", [b"", b"not a key at all", b"\x08\x01\x12\x03abc"])
def test_an_identity_path_that_is_not_a_key_is_refused_by_name(tmp_path, content):
    path = tmp_path / "broken.key"
    path.write_bytes(content)
    with pytest.raises(BadRequest, match="--identity-path .*not a key Potluck can use"):
        identity_path(str(path), "x", "--identity-path")
    assert path.read_bytes() == content  # the operator's file is left as it was


def test_an_unusable_cached_key_is_replaced_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path))
    first = identity_path(None, "carol")
    load_identity(first)
    identity._held.pop(identity.os.path.realpath(first.replace(".key", ".lock"))).close()  # as a new process
    identity.os.chmod(first, 0o600)  # hivemind writes keys read-only
    with open(first, "r+b") as f:  # as a disk fault or an interrupted copy leaves it
        f.truncate(10)
    with caplog.at_level(logging.WARNING):
        again = identity_path(None, "carol")
    assert again == first and "cannot be used" in caplog.text
    load_identity(again)
