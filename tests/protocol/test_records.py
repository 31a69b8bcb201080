"""Records survive the DHT's msgpack round trip; unknown fields are ignored, bad ones refused."""
import msgpack
import pytest

from potluck.protocol.errors import BadRequest, CacheFull, MaxLengthExceeded, PotluckError, ProtocolViolation
from potluck.protocol.records import ModelInfo, NodeRecord, NodeState, pack, unpack_model_info, unpack_node_record


def test_node_record_round_trip():
    record = NodeRecord(model="m", start=2, end=5, state=NodeState.ONLINE, public_name="bob", dtype="bfloat16",
                        device="cuda", inference_steps_per_s=100.0, cache_tokens_left=4096, pings={"peer": 0.01},
                        reachability="relayed", relays=("/ip4/203.0.113.7/tcp/4000/p2p/QmRelay/p2p-circuit",))
    assert unpack_node_record(pack(record)) == record


def test_a_record_from_before_devices_reads_as_cpu():
    fields = msgpack.unpackb(pack(NodeRecord(model="m", start=0, end=1, state=NodeState.ONLINE)))
    del fields["device"]
    assert unpack_node_record(msgpack.packb(fields)).device == "cpu"


def test_unknown_fields_are_ignored():
    fields = msgpack.unpackb(pack(NodeRecord(model="m", start=0, end=1, state=NodeState.JOINING)))
    fields["from_the_future"] = [1, 2, 3]
    assert unpack_node_record(msgpack.packb(fields)).state == NodeState.JOINING


@pytest.mark.parametrize("change", [{"start": "0"}, {"state": "exploded"}, {"start": 3, "end": 2},
                                    {"cache_tokens_left": True}, {"pings": [1]}, {"relays": "/ip4/1.2.3.4"},
                                    {"relays": [1]}, {"relays": ["x" * 301]}, {"relays": ["/ip4/1.2.3.4"] * 9}])
def test_malformed_records_are_refused(change):
    fields = msgpack.unpackb(pack(NodeRecord(model="m", start=0, end=1, state=NodeState.ONLINE)))
    fields.update(change)
    assert unpack_node_record(msgpack.packb(fields)) is None


def test_a_public_name_reaches_terminals_and_logs_escaped_and_short():
    fields = msgpack.unpackb(pack(NodeRecord(model="m", start=0, end=1, state=NodeState.ONLINE)))
    fields["public_name"] = "bob\nnode Qm... ONLINE\x1b[2J" + "x" * 100  # forged lines, a terminal escape
    name = unpack_node_record(msgpack.packb(fields)).public_name
    assert name.isprintable() and name.startswith("bob\\nnode Qm... ONLINE\\x1b[2J") and len(name) < 100


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1]), "text", None, b"\x00" * 20000])
def test_garbage_is_not_a_record(data):
    assert unpack_node_record(data) is None
    assert unpack_model_info(data) is None


def test_model_info_round_trip():
    info = ModelInfo(name="m", num_blocks=30, family="llama", hidden_size=576)
    assert unpack_model_info(pack(info)) == info


@pytest.mark.parametrize("error", [BadRequest("x"), CacheFull("full"), MaxLengthExceeded("long")])
def test_errors_travel_with_their_class(error):
    back = PotluckError.from_wire(error.to_wire())
    assert type(back) is type(error) and str(back) == str(error)


def test_malformed_error_payload_is_a_protocol_violation():
    assert isinstance(PotluckError.from_wire({"code": 2}), ProtocolViolation)
    assert type(PotluckError.from_wire({"code": 999, "message": "?"})) is PotluckError


def test_the_model_index_counts_signed_entries_and_most_nodes_win():
    from types import SimpleNamespace

    from potluck.protocol.directory import parse_index

    def entry(items):
        return SimpleNamespace(value={k: SimpleNamespace(value=pack(v), expiration_time=t) for k, (v, t) in items})

    real, fake = ModelInfo("m", 8, "llama", 64), ModelInfo("m", 4000, "llama", 64)
    a, b, c = ("12D3KooW" + ch * 44 for ch in "abc")
    index = parse_index(entry([(a, (real, 10.0)), (b, (real, 11.0)), (c, (fake, 99.0)),
                               ("m", (fake, 99.0))]))  # an entry under a model name: nobody signed it
    assert index == {"m": real}
    assert parse_index(entry([("m", (real, 10.0))])) == {}
    too_big = ModelInfo("huge", 10**6, "llama", 64)  # a reader would read a million keys
    assert parse_index(entry([(a, (too_big, 10.0))])) == {}
    tie = parse_index(entry([(a, (real, 10.0)), (b, (ModelInfo("m", 9, "llama", 64), 12.0))]))
    assert tie["m"].num_blocks == 9  # as many nodes each way: the latest to expire
