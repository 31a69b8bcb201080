"""A peer's lasting identity: the private key behind its peer id, kept in the cache folder.

A node (per public name) and a bootstrap peer keep their key in ``$POTLUCK_CACHE/identities``, so
a restart is the same peer: the dashboard and routing see one node, and the address a bootstrap
peer printed stays valid. A key is used by one process at a time (a lock file beside it); a
second process asking for the same key gets a new identity for this run and a warning, and a
cached key that cannot be read is replaced, with a warning. A key named by --identity-path is the
operator's own: one that another process on this machine holds, or that is not a key, is refused
in a line naming the option (p2pd would otherwise fail on it in a way that reads as a network
error, or two processes would announce one peer id).
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .default_model import default_cache_dir
from .errors import BadRequest

logger = logging.getLogger(__name__)
_held: dict[str, object] = {}  # path -> its open file, locked until this process exits


def identity_path(explicit: str | None, name: str, option: str = "--public-name") -> str:
    """The key file to start the P2P daemon with: ``explicit`` (--identity-path) if given, else the
    cache folder's key for ``name``; a fresh key for this run when another process holds that one.
    (A node signs its records with this key, so it always has one.)"""
    if explicit:
        return _explicit(explicit)
    path = default_cache_dir() / "identities" / f"{_file_name(name)}.key"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError as e:
        logger.warning("cannot keep an identity in %s (%s); this run gets a new peer id", path.parent, e)
        return _fresh_identity()
    if not _locked(lock):
        logger.warning("another process on this machine uses the identity of %r; this run gets a new peer id "
                       "(give each node its own %s to keep one)", name, option)
        return _fresh_identity()
    problem = _unusable(path) if path.exists() else None
    if problem is not None:
        logger.warning("the identity kept in %s cannot be used (%s); it is replaced: this peer gets a new id",
                       path, problem)
    if problem is not None or not path.exists():
        _generate(path)
        logger.debug("new identity for %r in %s", name, path)
    return str(path)


def _explicit(given: str) -> str:
    """The key file named by --identity-path, made if missing (as p2pd would), locked for this process."""
    path = Path(given).expanduser()
    if not path.parent.is_dir():
        raise BadRequest(f"--identity-path {given}: the folder {path.parent} does not exist")
    try:
        if not path.exists():
            _generate(path)
        problem = _unusable(path)
        key = open(path, "rb")
    except OSError as e:
        raise BadRequest(f"--identity-path {given}: {e.strerror or e}") from None
    if problem is not None:
        key.close()
        raise BadRequest(f"--identity-path {given}: not a key Potluck can use ({problem}); "
                         f"name a new file and one is made")
    if not _locked(key):
        raise BadRequest(f"--identity-path {given}: another process on this machine uses this key; "
                         f"give each process its own file")
    return str(path)


def _locked(file) -> bool:
    """Whether this process holds ``file``'s lock (from now, or already: a second open file would
    not get it), until it exits; the file is closed unless it is the one holding the lock."""
    path = os.path.realpath(file.name)
    if path in _held:
        file.close()
        return True
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.close()
        return False
    _held[path] = file
    return True


def _unusable(path: Path) -> str | None:
    """Why the key file at ``path`` cannot sign this peer's records; None if it can."""
    from .signing import load_identity

    try:
        load_identity(str(path))
    except Exception as e:  # unreadable, or a protobuf, DER or key type error: not a key we can use
        return f"{type(e).__name__}: {e}"[:200]
    return None


def _generate(path: Path) -> None:
    """A new key at ``path``, replacing what is there (hivemind writes keys read-only)."""
    from hivemind.p2p import P2P

    path.unlink(missing_ok=True)
    P2P.generate_identity(str(path))


def _fresh_identity() -> str:
    """A key for this run only, in a private temporary folder removed at exit."""
    folder = tempfile.mkdtemp(prefix="potluck-identity-")
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "identity.key")
    _generate(Path(path))
    return path


def _file_name(name: str) -> str:
    """A file name for any public name: readable where it can be, unique always."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60].strip("._") or "node"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
