"""A peer's share of a node: streams, sessions, cache and bytes being read, and streams that idle or trickle."""
import asyncio

import pytest

from potluck.node.limits import Limits, PeerLimits
from potluck.protocol import messages as msg
from potluck.protocol.errors import MessageTooLarge, PeerLimitReached

FAST = Limits(streams_per_peer=2, sessions_per_peer=3, cache_share_per_peer=0.5, reading_bytes_per_peer=1000,
              reading_bytes=1500, frame_timeout=0.2, idle_timeout=0.2, session_idle_timeout=5)


def header(length: int) -> bytes:
    return length.to_bytes(msg.HEADER_BYTES, "big")


def test_streams_and_sessions_per_peer():
    limits = PeerLimits(FAST, cache_tokens=1000)
    limits.open_stream("a")
    limits.open_stream("a")
    with pytest.raises(PeerLimitReached, match="streams_per_peer"):
        limits.open_stream("a")
    limits.open_stream("b")  # another peer is not held back
    limits.close_stream("a")
    limits.open_stream("a")
    limits.check_session("a", sessions=2, reserved=100, needed=400)
    with pytest.raises(PeerLimitReached, match="cache_share_per_peer"):
        limits.check_session("a", sessions=2, reserved=100, needed=401)  # over half of the cache
    with pytest.raises(PeerLimitReached, match="sessions_per_peer"):
        limits.check_session("a", sessions=3, reserved=0, needed=1)
    assert limits.refusals == {"streams_per_peer": 1, "cache_share_per_peer": 1, "sessions_per_peer": 1}


def test_a_frame_is_checked_before_its_payload_is_read():
    async def scenario():
        limits = PeerLimits(FAST, cache_tokens=1000)
        reader = asyncio.StreamReader()
        reader.feed_data(header(10_000))  # declares more than the stream's requests can need
        with pytest.raises(MessageTooLarge):
            await limits.read_frame(reader, "a", max_bytes=5000, sessions_open=False)

        trickling = asyncio.StreamReader()
        trickling.feed_data(header(900) + b"x" * 10)  # the rest never comes
        first = asyncio.ensure_future(limits.read_frame(trickling, "a", max_bytes=5000, sessions_open=False))
        await asyncio.sleep(0.01)
        assert limits.reading_total == 900
        second = asyncio.StreamReader()
        second.feed_data(header(200))
        with pytest.raises(PeerLimitReached, match="reading_bytes_per_peer"):  # 900 + 200 > 1000 from one peer
            await limits.read_frame(second, "a", max_bytes=5000, sessions_open=False)
        other = asyncio.StreamReader()
        other.feed_data(header(700))
        with pytest.raises(PeerLimitReached, match="'reading_bytes'"):  # 900 + 700 > 1500 from everyone
            await limits.read_frame(other, "b", max_bytes=5000, sessions_open=False)
        with pytest.raises(TimeoutError):  # the trickle ran out of time
            await first
        assert limits.reading_total == 0 and not limits.reading

        silent = asyncio.StreamReader()
        with pytest.raises(TimeoutError):  # no header within the idle timeout
            await limits.read_frame(silent, "a", max_bytes=5000, sessions_open=False)
        honest = asyncio.StreamReader()
        honest.feed_data(msg.encode_frame({"type": "info"}))
        return await limits.read_frame(honest, "a", max_bytes=5000, sessions_open=True)

    assert asyncio.run(scenario()).meta == {"type": "info"}


def test_requests_per_peer_refill_at_the_rate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("potluck.node.limits.time.monotonic", lambda: now[0])
    limits = PeerLimits(Limits(requests_per_peer_s=10), cache_tokens=1000)
    for _ in range(10):  # a second's worth at once
        limits.take_request("a")
    with pytest.raises(PeerLimitReached, match="requests_per_peer_s"):
        limits.take_request("a")
    limits.take_request("b")  # another peer is not held back
    now[0] += 0.25  # 2.5 requests' worth later
    limits.take_request("a")
    limits.take_request("a")
    with pytest.raises(PeerLimitReached):
        limits.take_request("a")
    assert limits.refusals["requests_per_peer_s"] == 2
    now[0] += 60  # long quiet: a whole second's worth again, never more
    for _ in range(10):
        limits.take_request("a")
    with pytest.raises(PeerLimitReached):
        limits.take_request("a")
