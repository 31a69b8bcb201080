"""A relayed node whose connection was cut (by its relay's limits) is reconnected, not banned; a
relay that does not answer, or cuts again at once, is the node's failure. What many sessions meet at
once is said once; failover settings are checked by name."""
import asyncio
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from potluck.client.routing import Hop
from potluck.client.swarm_view import FailoverPolicy, SwarmView
from potluck.protocol.errors import BadRequest
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


def test_what_many_sessions_meet_at_once_is_said_once_a_while():
    swarm_view = view()
    assert swarm_view.first_time(("waiting for", "blocks 4:8"), 60.0)
    assert not any(swarm_view.first_time(("waiting for", "blocks 4:8"), 60.0) for _ in range(31))
    assert swarm_view.first_time(("waiting for", "blocks 0:4"), 60.0)  # other blocks: news
    assert swarm_view.first_time(("waiting for", "blocks 4:8"), 0.0)  # a while later


@pytest.mark.parametrize("setting, value", [("route_wait", -1), ("route_wait", float("inf")), ("route_wait", True),
                                            ("request_timeout", 0), ("max_retries", 1.5), ("ban_time", "30")])
def test_a_failover_setting_that_is_not_seconds_is_refused_by_name(setting, value):
    with pytest.raises(BadRequest, match=f"^{setting}="):
        FailoverPolicy(**{setting: value})
    assert FailoverPolicy(route_wait=np.int64(2), request_timeout=np.float64(0.5)).route_wait == 2  # numbers all the same


def test_a_node_banned_for_a_wrong_result_is_not_taken_back_for_answering():
    from potluck.client.failover import _back_if_answering

    class Answers:
        async def info(self, *args, **kwargs):
            return None, 0.001

    swarm_view = SwarmView(Answers(), "m", 4)
    failed = SimpleNamespace(hop=Hop(PEER, 0, 4, NodeRecord(model="m", start=0, end=4, state=NodeState.ONLINE)))
    swarm_view.ban(PEER, "computed wrong", seconds=3600)
    asyncio.run(_back_if_answering(swarm_view, failed))
    assert PEER in swarm_view.banned
    swarm_view.banned.clear()
    swarm_view.ban(PEER, "broken stream")  # a failure: it answers again, it is back
    asyncio.run(_back_if_answering(swarm_view, failed))
    assert PEER not in swarm_view.banned
