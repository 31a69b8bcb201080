"""Listen addresses, UPnP and relays by case, and initial peers checked before anything starts."""
import pytest
from hivemind.p2p import PeerID

from potluck.protocol.errors import BadRequest
from potluck.protocol.network import (
    LOOPBACK_MADDR, PUBLIC_MADDR, check_peer_maddr, dialable, initial_peers_from_env, launch_options, p2p_options,
    relay_addresses,
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


def test_auto_relay_only_behind_nat():
    assert not p2p_options(initial_peers=[LOCAL])["use_auto_relay"]
    assert not p2p_options(initial_peers=[REMOTE])["use_auto_relay"]  # until peers find they cannot dial it
    assert launch_options([REMOTE], None, None, False, False, True, False, True)[0]["use_auto_relay"]


def test_daemon_flags_for_relays_and_peers_behind_nat():
    from potluck.protocol.network import _p2p_class

    assert "-relayService=0" in _p2p_class(relayService=False)._make_process_args("p2pd", relay=True)
    assert "-relayDiscovery=0" in _p2p_class(relayDiscovery=False)._make_process_args("p2pd", autoRelay=True)
    args = (None, None, False)
    options, daemon = launch_options([REMOTE], *args, False, True, True, False)
    assert options["force_reachability"] == "public" and daemon == {"relayService": True}  # a bootstrap: full relay
    options, daemon = launch_options([LOCAL], *args, False, True, True, False)
    assert "force_reachability" not in options  # on this machine nobody needs a relay
    options, daemon = launch_options([REMOTE, LOCAL], *args, False, True, False, True)  # a node behind NAT
    assert options["trusted_relays"] == [REMOTE] and options["use_auto_relay"]
    assert options["force_reachability"] == "private"
    assert daemon == {"relayService": False, "relayDiscovery": False}  # slots on the static relays at once
    options, daemon = launch_options([REMOTE], *args, True, True, True, True)  # a client relays for nobody
    assert not options["use_auto_relay"] and daemon == {"relayService": False} and "force_reachability" not in options
    assert relay_addresses([REMOTE, LOCAL]) == [f"{REMOTE}/p2p-circuit"]


def test_circuit_addresses_are_written_as_p2pd_reads_them():
    from potluck.protocol.network import _circuit_maddr

    relay = REMOTE.split("/p2p/")[1]
    raw = _circuit_maddr(f"{REMOTE}/p2p-circuit").to_bytes()
    assert raw.endswith(b"\xa2\x02") and PeerID.from_base58(relay).to_bytes() in raw  # the id as a bare multihash
    for bad in [REMOTE, "/ip4/1.2.3.4/tcp/1/p2p-circuit", f"{REMOTE}/p2p-circuit/extra", "/p2p/x/p2p-circuit"]:
        with pytest.raises(ValueError):
            _circuit_maddr(bad)


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
