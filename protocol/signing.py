"""Signed node records: only the holder of a node's key can announce, overwrite or withdraw its record.

A node's record sits under its peer id (the DHT subkey). The peer id is the hash of the node's
libp2p public key (RSA, as hivemind makes identities), so a record can prove who wrote it: the
node appends its public key and a signature over (key, subkey, value, expiration) to the value.
``NodeRecordValidator`` is installed in every peer's DHT (``network.join_swarm``): it signs this
peer's own records, and refuses to store or believe any record under a peer-id subkey whose key
does not hash to that peer id or whose signature does not verify (an unsigned one included).
Other subkeys are not bound to a peer and pass; readers trust only peer-id subkeys
(``names_a_peer``): the model index too holds one entry per node, under its peer id.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import struct

import base58
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.proto import crypto_pb2

logger = logging.getLogger(__name__)

_TRAILER = b"POTLUCK-SIG1"  # value + public key + signature + their lengths + this
_LENGTHS = struct.Struct(">HH")
_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_PEER_ID = re.compile(r"^(Qm|12D3KooW)[1-9A-HJ-NP-Za-km-z]{44}$")  # what libp2p peer ids look like


def peer_id_of(public_der: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key (DER, SubjectPublicKeyInfo)."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    return base58.b58encode(b"\x12\x20" + hashlib.sha256(encoded).digest()).decode()  # sha2-256 multihash


def load_identity(path: str) -> rsa.RSAPrivateKey:
    """The private key in a libp2p identity file (as ``P2P.generate_identity`` writes it)."""
    with open(path, "rb") as f:
        key = crypto_pb2.PrivateKey.FromString(f.read())
    if key.key_type != crypto_pb2.RSA:
        raise ValueError(f"{path} holds a {crypto_pb2.KeyType.Name(key.key_type)} key; Potluck signs with RSA keys")
    return serialization.load_der_private_key(key.data, password=None)


class NodeRecordValidator(RecordValidatorBase):
    """Signs this peer's records (when it has a key) and checks everyone's."""

    def __init__(self, identity_path: str | None = None):
        self._key = load_identity(identity_path) if identity_path else None
        self._public = b""
        self.peer_id = None  # this peer's id, if it signs
        if self._key is not None:
            self._public = self._key.public_key().public_bytes(serialization.Encoding.DER,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo)
            self.peer_id = peer_id_of(self._public)
        self.rejected = 0  # records refused: unsigned, signed by another key, or altered

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._key is None or _subkey_peer(record) != self.peer_id:
            return record.value
        signature = self._key.sign(_signed_bytes(record), _PADDING, hashes.SHA256())
        return record.value + self._public + signature + _LENGTHS.pack(len(self._public), len(signature)) + _TRAILER

    def validate(self, record: DHTRecord) -> bool:
        peer = _subkey_peer(record)
        if peer is None:
            return True  # not a node's record
        parts = _split(record.value)
        if parts is None:
            return self._reject(peer, "it is not signed")
        value, public_der, signature = parts
        if peer_id_of(public_der) != peer:
            return self._reject(peer, "it is signed by another peer's key")
        try:
            public = serialization.load_der_public_key(public_der)
            public.verify(signature, _signed_bytes(dataclasses.replace(record, value=value)), _PADDING, hashes.SHA256())
        except (InvalidSignature, ValueError, TypeError):
            return self._reject(peer, "its signature does not verify")
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        parts = _split(record.value)
        return record.value if parts is None else parts[0]

    def _reject(self, peer: str, why: str) -> bool:
        self.rejected += 1
        logger.debug("refusing a record under node %s: %s", peer, why)
        return False

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def names_a_peer(subkey: object) -> bool:
    """Whether a (decoded) subkey is a peer id, so that the DHT kept its value only if signed by that peer."""
    return isinstance(subkey, str) and _PEER_ID.match(subkey) is not None


def _subkey_peer(record: DHTRecord) -> str | None:
    """The peer id a record's subkey names, or None if it names no peer."""
    try:
        subkey = msgpack.unpackb(record.subkey, raw=False)
    except Exception:  # not msgpack, or not a regular subkey at all
        return None
    return subkey if names_a_peer(subkey) else None


def _signed_bytes(record: DHTRecord) -> bytes:
    return msgpack.packb([record.key, record.subkey, record.value, record.expiration_time], use_bin_type=True)


def _split(value: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(value, public key, signature) of a signed value; None if it carries no trailer."""
    end = len(value) - len(_TRAILER) - _LENGTHS.size
    if end < 0 or not value.endswith(_TRAILER):
        return None
    key_length, signature_length = _LENGTHS.unpack_from(value, end)
    start = end - key_length - signature_length
    if start < 0:
        return None
    return value[:start], value[start:start + key_length], value[start + key_length:end]
