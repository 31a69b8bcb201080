"""A relayed node whose connection was cut (by its relay's limits) is reconnected, not banned; a
relay that does not answer, or cuts again at once, is the node's failure."""
import asyncio
import logging
from types import SimpleNamespace

from potluck.client.routing import Hop
from potluck.client.swarm_view import SwarmView
from potluck.protocol.records import NodeRecord, NodeState

RELAY = "/ip4/203.0.113.7/tcp/4000/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb/p2p-circuit"
PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


class Daemon:
    """Stands for p2pd's control client: records connects, fails them when told to."""

    def __init__(self, works: bool):
        self.works, self.connects = works, []

    async def connect(self, peer_id, maddrs):
        self.connects.append((peer_id.to_base58(), [str(m) for m in maddrs]))
        if not self.works:
            raise ConnectionError("no relay answered")


def hop(reachability: str, relays=(RELAY,)) -> Hop:
    record = NodeRecord(model="m", start=0, end=4, state=NodeState.ONLINE, reachability=reachability,
                        relays=tuple(relays))
    return Hop(PEER, 0, 4, record)


def view(works: bool = True) -> SwarmView:
    swarm = SimpleNamespace(p2p=SimpleNamespace(_client=Daemon(works)))
    return SwarmView(swarm, "m", 4)


def test_a_cut_relayed_connection_is_reconnected_once_within_the_grace():
    v = view()
    assert asyncio.run(v.relay_cut(hop("relayed")))
    (peer, maddrs), = v.swarm.p2p._client.connects
    assert peer == PEER and maddrs == [RELAY]
    assert not asyncio.run(v.relay_cut(hop("relayed")))  # cut again at once: the node's failure
    v.relay_cuts[PEER] -= v.policy.relay_grace
    assert asyncio.run(v.relay_cut(hop("relayed")))


def test_direct_nodes_and_relays_that_do_not_answer_are_failures():
    assert not asyncio.run(view().relay_cut(hop("direct")))
    assert not asyncio.run(view().relay_cut(hop("relayed", relays=())))
    v = view(works=False)
    assert not asyncio.run(v.relay_cut(hop("relayed")))
    assert len(v.swarm.p2p._client.connects) == 1 and PEER not in v.relay_cuts


def test_a_node_banned_by_many_sessions_at_once_is_said_once(caplog):
    caplog.set_level(logging.WARNING, logger="potluck.client.swarm_view")
    swarm_view = view()
    for _ in range(32):  # every session of a serve that met the same dead node
        swarm_view.ban("QmDead", "broken stream")
    swarm_view.ban("QmDead", "computed wrong", seconds=3600)  # a longer ban is news
    assert [r.getMessage() for r in caplog.records] == ["banning node QmDead for 30 s: broken stream",
                                                         "banning node QmDead for 3600 s: computed wrong"]
