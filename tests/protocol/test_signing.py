"""Signed node records: a node's own records verify; unsigned, foreign-signed or altered ones do not."""
import dataclasses

import msgpack
import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from potluck.protocol.signing import NodeRecordValidator


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    paths = [str(folder / f"{name}.key") for name in ("node", "other")]
    for path in paths:
        P2P.generate_identity(path)
    return paths


def record(peer_id: str, value: bytes = b"record", expiration: float = 100.0) -> DHTRecord:
    return DHTRecord(b"key-id", msgpack.packb(peer_id), msgpack.packb(value), expiration)


def test_the_peer_id_is_the_one_p2pd_derives_from_the_key(keys):
    with open(keys[0], "rb") as f:
        assert NodeRecordValidator(keys[0]).peer_id == PeerID.from_identity(f.read()).to_base58()


def test_own_records_verify_and_forged_ones_do_not(keys):
    node, other, reader = NodeRecordValidator(keys[0]), NodeRecordValidator(keys[1]), NodeRecordValidator()
    mine = record(node.peer_id)
    signed = dataclasses.replace(mine, value=node.sign_value(mine))
    assert reader.validate(signed) and reader.strip_value(signed) == mine.value
    assert not reader.validate(mine)  # unsigned
    assert other.sign_value(mine) == mine.value  # a peer signs only its own records...
    forged = record(node.peer_id, b"OFFLINE")
    by_other = dataclasses.replace(forged, value=forged.value + signed.value[len(mine.value):])
    assert not reader.validate(by_other)  # ...and cannot reuse another's signature on other content
    later = dataclasses.replace(signed, expiration_time=1e9)
    assert not reader.validate(later)  # nor extend it
    their_own = record(other.peer_id)
    moved = dataclasses.replace(mine, value=other.sign_value(their_own))  # a valid signature, wrong subkey
    assert not reader.validate(moved)
    assert reader.rejected == 4


def test_records_not_under_a_peer_id_need_no_signature():
    index = DHTRecord(b"key-id", msgpack.packb("SmolLM2-135M-Instruct"), msgpack.packb(b"info"), 100.0)
    assert NodeRecordValidator().validate(index)
