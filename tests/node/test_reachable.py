"""What a node tells its owner about reachability: the relay that serves it, the port to forward."""
import logging

from potluck.node.reachable import explain
from potluck.protocol.reachability import DIRECT, RELAYED, UNKNOWN, Reachability

RELAY = "/ip4/203.0.113.7/tcp/4000/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb/p2p-circuit"
ADDRESSES = ["/ip4/192.168.1.20/tcp/31337/p2p/QmNode"]


def test_a_node_behind_nat_names_its_relay_and_the_port_to_forward(caplog):
    with caplog.at_level(logging.INFO, "potluck.node.reachable"):
        explain(Reachability(RELAYED, (), 2), ADDRESSES, [RELAY])
    (line,) = caplog.messages
    assert "2 peers tried" in line and "through the relay /ip4/203.0.113.7/tcp/4000 " in line
    assert "forward TCP port 31337" in line and "--announce-maddrs /ip4/YOUR_PUBLIC_IP/tcp/31337" in line


def test_without_a_relay_it_says_whom_it_serves(caplog):
    with caplog.at_level(logging.INFO, "potluck.node.reachable"):
        explain(Reachability(RELAYED, (), 1), ADDRESSES, [])
    assert "serves only peers it has connected to itself" in caplog.messages[0]


def test_reachable_and_unknown(caplog):
    with caplog.at_level(logging.INFO, "potluck.node.reachable"):
        explain(Reachability(DIRECT, ("/ip4/203.0.113.9/tcp/1",), 2), ADDRESSES, [])
        explain(Reachability(UNKNOWN), ADDRESSES, [])
    assert caplog.messages[0] == ("other machines reach this node directly at /ip4/203.0.113.9/tcp/1 "
                                  "(checked by 2 peers)")
    assert "asking again later" in caplog.messages[1]
