"""A peer's lasting identity: the private key behind its peer id, kept in the cache folder.

A node (per public name) and a bootstrap peer keep their key in ``$POTLUCK_CACHE/identities``, so
a restart is the same peer: the dashboard and routing see one node, and the address a bootstrap
peer printed stays valid. A key is used by one process at a time (a lock file beside it); a
second process asking for the same key gets a new identity for this run and a warning.
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
_held: list = []  # open lock files: each key stays locked until this process exits


def identity_path(explicit: str | None, name: str, option: str = "--public-name") -> str:
    """The key file to start the P2P daemon with: ``explicit`` (--identity-path) if given, else the
    cache folder's key for ``name``; a fresh key for this run when another process holds that one.
    (A node signs its records with this key, so it always has one.)"""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.parent.is_dir():
            raise BadRequest(f"--identity-path {explicit}: the folder {path.parent} does not exist")
        return str(path)
    path = default_cache_dir() / "identities" / f"{_file_name(name)}.key"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError as e:
        logger.warning("cannot keep an identity in %s (%s); this run gets a new peer id", path.parent, e)
        return _fresh_identity()
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        logger.warning("another process on this machine uses the identity of %r; this run gets a new peer id "
                       "(give each node its own %s to keep one)", name, option)
        return _fresh_identity()
    _held.append(lock)
    if not path.exists():
        from hivemind.p2p import P2P

        P2P.generate_identity(str(path))
        logger.debug("new identity for %r in %s", name, path)
    return str(path)


def _fresh_identity() -> str:
    """A key for this run only, in a private temporary folder removed at exit."""
    from hivemind.p2p import P2P

    folder = tempfile.mkdtemp(prefix="potluck-identity-")
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "identity.key")
    P2P.generate_identity(path)
    return path


def _file_name(name: str) -> str:
    """A file name for any public name: readable where it can be, unique always."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60].strip("._") or "node"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
