"""Listen addresses and UPnP by case, and initial peers checked before anything starts."""
import pytest

from potluck.protocol.errors import BadRequest
from potluck.protocol.network import (
    LOOPBACK_MADDR, PUBLIC_MADDR, check_peer_maddr, dialable, initial_peers_from_env, p2p_options,
)

LOCAL = "/ip4/127.0.0.1/tcp/4000/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb"
REMOTE = "/ip4/203.0.113.7/tcp/4000/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb"


def listening(**kwargs):
    options = p2p_options(**kwargs)
    return options["host_maddrs"], options["nat_port_map"]


def test_loopback_unless_asked_to_be_reachable():
    assert listening(initial_peers=[]) == ([LOOPBACK_MADDR], False)  # a new swarm, not asked to be public
    assert listening(initial_peers=[LOCAL]) == ([LOOPBACK_MADDR], False)
    assert listening(initial_peers=[], public=True) == ([PUBLIC_MADDR], True)
    assert listening(initial_peers=[REMOTE]) == ([PUBLIC_MADDR], True)  # joining a real swarm
    assert listening(initial_peers=[REMOTE], host_maddrs=["/ip4/127.0.0.1/tcp/5"]) == (["/ip4/127.0.0.1/tcp/5"], False)
    assert listening(initial_peers=[], host_maddrs=["/ip4/0.0.0.0/tcp/31337"]) == (["/ip4/0.0.0.0/tcp/31337"], True)


def test_auto_relay_where_the_peer_joins_beyond_loopback():
    assert not p2p_options(initial_peers=[LOCAL])["use_auto_relay"]
    assert p2p_options(initial_peers=[REMOTE])["use_auto_relay"]  # behind a home router, relays serve it


def test_the_relay_service_is_a_daemon_flag():
    from potluck.protocol.network import _p2p_class

    assert "-relayService=0" in _p2p_class(False)._make_process_args("p2pd", relay=True)
    assert "-relayService=1" in _p2p_class(True)._make_process_args("p2pd", relay=True)


def test_initial_peers_must_be_peer_multiaddrs(monkeypatch):
    check_peer_maddr(REMOTE)
    for bad in ["127.0.0.1:37677", "/ip4/127.0.0.1/tcp/4000", "/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb",
                "/ip4/1.2.3.4/tcp/1/p2p/not-a-peer-id"]:
        with pytest.raises(BadRequest, match="expected the form /ip4/"):
            check_peer_maddr(bad)
    monkeypatch.setenv("POTLUCK_INITIAL_PEERS", f"{LOCAL},oops")
    with pytest.raises(BadRequest, match=r"\$POTLUCK_INITIAL_PEERS: 'oops'"):
        initial_peers_from_env([])
    assert initial_peers_from_env([REMOTE]) == [REMOTE]


def test_only_addresses_other_machines_can_dial_are_shown():
    assert dialable([LOCAL, REMOTE, "/ip6/::1/tcp/5/p2p/x"]) == [REMOTE]
