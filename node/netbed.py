"""A small internet on one machine, for tests and benchmarks: Linux network namespaces joined by a
router namespace, one of them behind NAT as a volunteer's home is.

    public  10.77.1.2 ─┐
    client  10.77.2.2 ─┼─ wan (routes) ─ 10.77.3.2 homegw (masquerade) 192.168.77.1 ─ home 192.168.77.2
    n1, n2… 10.77.4.2… ┘  (10.77.x.1)

A process in ``public``, ``client`` or an extra place (``NetBed(extra=["n1", ...])``) can dial
the others' 10.77 addresses; one in ``home`` can dial out, but nobody outside can dial in (the
home router forwards no port), exactly what a volunteer behind a router gets.

Latency: this kernel has no ``netem``, so ``delay(ms)`` starts a transparent TCP proxy in the
router namespace (``nft`` redirects every TCP connection crossing the router to it) that holds
each chunk of data ``ms`` milliseconds before passing it on, in both directions: every link
between two places then has that one-way delay (a connection's own handshake is not delayed).

Needs root, ``ip`` and ``nft``: ``unavailable()`` says what is missing. Every namespace and link
carries a random tag, so beds do not collide; ``close()`` removes everything it made.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time

PLACES = {"public": "10.77.1", "client": "10.77.2", "homegw": "10.77.3"}  # on the wan router, .1 is its side
HOME_NET = "192.168.77"
PROXY_PORT = 7777  # the delaying proxy, in the router namespace
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where a redirected connection was going


def unavailable() -> str | None:
    """Why a bed cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 nftables)"
    return None


class NetBed:
    def __init__(self, extra: tuple[str, ...] | list[str] = ()) -> None:
        self.tag = secrets.token_hex(2)
        self.places = {**PLACES, **{place: f"10.77.{4 + n}" for n, place in enumerate(extra)}}
        self.names = {place: f"plk{self.tag}{place}" for place in ["wan", *self.places, "home"]}
        self.made: list[str] = []
        self._proxy: subprocess.Popen | None = None

    def address(self, place: str) -> str:
        return f"{HOME_NET}.2" if place == "home" else f"{self.places[place]}.2"

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
            for n, (place, net) in enumerate(self.places.items()):
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

    def delay(self, ms: float) -> None:
        """Hold every byte crossing the router ``ms`` milliseconds (0: no proxy, no delay)."""
        self._stop_proxy()
        if ms <= 0:
            return
        self._proxy = subprocess.Popen([*self.prefix("wan"), sys.executable, "-m", "potluck.node.netbed", "delay",
                                        str(ms)], stdout=subprocess.PIPE, text=True)
        if self._proxy.stdout.readline().strip() != "ready":
            raise RuntimeError("the delaying proxy did not start")
        rules = ("table ip potluck_delay {\n chain pre {\n  type nat hook prerouting priority -100;\n"
                 f"  ip protocol tcp redirect to :{PROXY_PORT}\n }}\n}}\n")
        subprocess.run([*self.prefix("wan"), "nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True)

    def firewall(self, place: str) -> None:
        """Let nothing from outside connect into ``place`` (what it opens itself still works): a
        client behind a firewall or a router of its own, which nobody can dial back."""
        rules = ('table inet potluck_firewall {\n chain in {\n  type filter hook input priority 0;\n'
                 '  iifname "eth0" ct state new drop\n }\n}\n')
        subprocess.run([*self.prefix(place), "nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True)

    def _stop_proxy(self) -> None:
        if self._proxy is not None:
            subprocess.run([*self.prefix("wan"), "nft", "delete", "table", "ip", "potluck_delay"], capture_output=True)
            self._proxy.kill()
            self._proxy.wait()
            self._proxy = None

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
        self._stop_proxy()
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()

    def __enter__(self) -> "NetBed":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.close()


async def _delaying_proxy(ms: float) -> None:
    """Accept connections redirected here, connect on to where each was going, and pass each
    chunk on ``ms`` milliseconds after it arrived, in both directions."""
    delay = ms / 1000

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((time.monotonic() + delay, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait(None)
        try:
            await delivering
        except (ConnectionError, OSError):
            pass

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket").getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, ip = struct.unpack("!H", raw[2:4])[0], socket.inet_ntoa(raw[4:8])
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(ip, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

    server = await asyncio.start_server(accepted, "0.0.0.0", PROXY_PORT)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__" and sys.argv[1:2] == ["delay"]:
    asyncio.run(_delaying_proxy(float(sys.argv[2])))
