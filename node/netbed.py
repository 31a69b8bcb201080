"""A small internet on one machine, for tests and benchmarks: Linux network namespaces joined by a
router namespace, one of them behind NAT as a volunteer's home is.

    public  10.77.1.2 ─┐
    client  10.77.2.2 ─┼─ wan (routes) ─ 10.77.3.2 homegw (masquerade) 192.168.77.1 ─ home 192.168.77.2
                        (10.77.x.1)

A process in ``public`` or ``client`` can dial the others' 10.77 addresses; one in ``home`` can
dial out, but nobody outside can dial in (the home router forwards no port), exactly what a
volunteer behind a router gets. Needs root, ``ip`` and ``nft``: ``unavailable()`` says what is
missing. Every namespace and link carries a random tag, so beds do not collide; ``close()``
removes everything it made.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess

PLACES = {"public": "10.77.1", "client": "10.77.2", "homegw": "10.77.3"}  # on the wan router, .1 is its side
HOME_NET = "192.168.77"


def unavailable() -> str | None:
    """Why a bed cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 nftables)"
    return None


class NetBed:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.names = {place: f"plk{self.tag}{place}" for place in ["wan", *PLACES, "home"]}
        self.made: list[str] = []

    def address(self, place: str) -> str:
        return f"{HOME_NET}.2" if place == "home" else f"{PLACES[place]}.2"

    def prefix(self, place: str) -> list[str]:
        """Prefix of a command line that runs it inside ``place``."""
        return ["ip", "netns", "exec", self.names[place]]

    def up(self) -> "NetBed":
        try:
            for name in self.names.values():
                self._ip("netns", "add", name)
                self.made.append(name)
                self._ip("-n", name, "link", "set", "lo", "up")
            self._sysctl("wan")
            for n, (place, net) in enumerate(PLACES.items()):
                self._link("wan", f"w{n}", f"{net}.1", place, "eth0", f"{net}.2")
                self._ip("-n", self.names[place], "route", "add", "default", "via", f"{net}.1")
            self._link("homegw", "lan0", f"{HOME_NET}.1", "home", "eth0", f"{HOME_NET}.2")
            self._ip("-n", self.names["home"], "route", "add", "default", "via", f"{HOME_NET}.1")
            self._sysctl("homegw")
            rules = ("table ip nat {\n chain post {\n  type nat hook postrouting priority 100;\n"
                     '  oifname "eth0" masquerade\n }\n}\n')
            subprocess.run([*self.prefix("homegw"), "nft", "-f", "-"], input=rules, text=True, check=True,
                           capture_output=True)
        except BaseException:
            self.close()
            raise
        return self

    def _link(self, a: str, a_dev: str, a_addr: str, b: str, b_dev: str, b_addr: str) -> None:
        """A veth pair between two namespaces, addressed in a /24."""
        left, right = f"pa{self.tag}{a_dev}", f"pb{self.tag}{b_dev}{a_dev}"[:15]
        self._ip("link", "add", left, "type", "veth", "peer", "name", right)
        for dev, place, name, addr in ((left, a, a_dev, a_addr), (right, b, b_dev, b_addr)):
            self._ip("link", "set", dev, "netns", self.names[place])
            self._ip("-n", self.names[place], "link", "set", dev, "name", name)
            self._ip("-n", self.names[place], "addr", "add", f"{addr}/24", "dev", name)
            self._ip("-n", self.names[place], "link", "set", name, "up")

    def _sysctl(self, place: str) -> None:
        subprocess.run([*self.prefix(place), "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True,
                       capture_output=True)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def close(self) -> None:
        """Remove every namespace made (their links and rules go with them)."""
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()

    def __enter__(self) -> "NetBed":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.close()
