"""Dial-back requests: only addresses another machine could dial, a few at a time."""
import pytest

from potluck.protocol.errors import BadRequest
from potluck.protocol.reachability import MAX_ADDRESSES, parse_request, tcp_target

PEER = "/p2p/12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def test_tcp_targets_are_ips_and_ports_another_machine_could_dial():
    assert tcp_target("/ip4/203.0.113.7/tcp/31337" + PEER) == ("203.0.113.7", 31337)
    assert tcp_target("/ip4/192.168.1.20/tcp/4000") == ("192.168.1.20", 4000)
    assert tcp_target("/ip6/2001:db8::1/tcp/4000") == ("2001:db8::1", 4000)
    for bad in ["/ip4/127.0.0.1/tcp/4000", "/ip4/0.0.0.0/tcp/4000", "/ip6/::1/tcp/4000", "/ip4/224.0.0.1/tcp/1",
                "/dns4/example.com/tcp/4000", "/ip4/1.2.3.4/udp/4000/quic", "/ip4/1.2.3.4/tcp/0",
                "/ip4/1.2.3.4/tcp/70000", "ip4/1.2.3.4/tcp/5", "/ip4/nonsense/tcp/5", ""]:
        with pytest.raises(BadRequest):
            tcp_target(bad)


def test_a_request_names_a_few_addresses():
    good = "/ip4/203.0.113.7/tcp/31337"
    assert parse_request({"type": "dialback", "addresses": [good]}) == [(good, ("203.0.113.7", 31337))]
    for meta in [None, {"type": "dialback"}, {"type": "dialback", "addresses": []},
                 {"type": "dialback", "addresses": [good] * (MAX_ADDRESSES + 1)},
                 {"type": "dialback", "addresses": [7]}, {"type": "info", "addresses": [good]},
                 {"type": "dialback", "addresses": ["/ip4/127.0.0.1/tcp/5"]}]:
        with pytest.raises(BadRequest):
            parse_request(meta)


def test_a_dial_back_counts_only_a_libp2p_greeting():
    import asyncio

    from potluck.protocol.reachability import LIBP2P_GREETING, _connects

    async def run():
        async def greeter(reader, writer):
            writer.write(LIBP2P_GREETING)
            await writer.drain()

        async def silent(reader, writer):  # accepts and says nothing, as a proxy with nowhere to go
            writer.close()

        servers = [await asyncio.start_server(handler, "127.0.0.1", 0) for handler in (greeter, silent)]
        ports = [server.sockets[0].getsockname()[1] for server in servers]
        results = [await _connects("127.0.0.1", port) for port in ports]
        for server in servers:
            server.close()
        return results

    assert asyncio.run(run()) == [True, False]
