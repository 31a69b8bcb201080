"""The dashboard's view layer and crawler merge rules, without a network; the HTTP server on loopback."""
import asyncio
import gzip
import json
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from potluck.client.health.crawler import NodeView, SwarmState, merge
from potluck.protocol.directory import parse_entries
from potluck.client.health.server import HealthServer
from potluck.client.health.view import block_counts, metrics_text, state_json, status, synthetic_state
from potluck.protocol.records import PROTOCOL_VERSION, ModelInfo, NodeRecord, NodeState, block_key, pack

MODEL = ModelInfo("m", 8, "llama", 64)
A, B, C = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "12D3KooWB", "12D3KooWC"


def view(peer, start, end, state=NodeState.ONLINE, **kwargs) -> NodeView:
    record = NodeRecord(model="m", start=start, end=end, state=state, public_name=f"node-{peer[-1]}",
                        pings=kwargs.pop("pings", {}), dtype=kwargs.pop("dtype", "float32"),
                        quant=kwargs.pop("quant", "none"))
    return NodeView(peer, record, kwargs.pop("expires_at", time.time() + 30), kwargs.pop("refreshed_at", None),
                    **kwargs)


def swarm(*views: NodeView, **kwargs) -> SwarmState:
    fields = {"updated_at": time.time(), "crawls": 1, **kwargs}
    return SwarmState(models={"m": MODEL}, nodes={"m": {v.peer_id: v for v in views}}, **fields)


def test_coverage_counts_live_online_nodes_and_marks_joining():
    views = {v.peer_id: v for v in [view(A, 0, 4), view(B, 2, 8), view(C, 6, 8, NodeState.JOINING)]}
    blocks = block_counts(MODEL, views)
    assert [b["online"] for b in blocks] == [1, 1, 2, 2, 1, 1, 1, 1]
    assert [b["joining"] for b in blocks] == [0] * 6 + [1, 1]
    unreachable = {A: view(A, 0, 4, probed=True, probe_failures=2), B: view(B, 4, 8, stale=True)}
    assert [b["online"] for b in block_counts(MODEL, unreachable)] == [0] * 8


def test_usable_means_usable_by_a_client_with_default_options_and_says_what_else_would_do():
    cases = [([view(A, 0, 4), view(B, 4, 8)], []),
             ([view(A, 0, 4), view(B, 4, 8, dtype="bfloat16")], ["--mix-dtypes"]),
             ([view(A, 0, 4), view(B, 4, 8, dtype="bfloat16"), view(C, 3, 8)], []),  # 0:4 then 4:8 in float32
             ([view(A, 0, 4), view(B, 4, 8, quant="int8")], ["--allow-quantized"]),
             ([view(A, 0, 4, quant="nf4"), view(B, 4, 8, dtype="bfloat16")], ["--mix-dtypes", "--allow-quantized"]),
             ([view(A, 0, 4), view(B, 5, 8)], None)]
    for views, needed in cases:
        model = state_json(swarm(*views))["models"][0]
        assert (model["usable"], model["usable_with"]) == (needed == [], needed), views
        assert (model["missing_blocks"] == []) == (needed is not None)
        usable = [line for line in metrics_text(swarm(*views)).splitlines() if line.startswith("potluck_model_usable{")]
        assert usable == [f'potluck_model_usable{{model="m"}} {float(needed == [])}']


def test_status_says_what_is_broken():
    assert status(view(A, 0, 4)) == "online" and status(view(A, 0, 4, stale=True)) == "stale"
    assert status(view(A, 0, 4, probed=True, probe_failures=1)) == "online"  # one lost probe is not enough
    assert status(view(A, 0, 4, probed=True, probe_failures=2)) == "unreachable"
    assert status(view(A, 0, 4, NodeState.DRAINING, probed=True, probe_failures=2)) == "offline"  # left as announced


def test_state_json_lists_models_nodes_spans_and_what_is_broken():
    now = time.time()
    state = swarm(view(A, 0, 4, refreshed_at=now - 3, ping_s=0.002, probed=True, tokens_served=40, relayed=False,
                       pings={B: 0.004}),
                  view(B, 2, 6, NodeState.DRAINING), view(C, 6, 8, stale=True, expires_at=now - 1), updated_at=now)
    doc = json.loads(json.dumps(state_json(state)))
    model = doc["models"][0]
    assert (model["name"], model["num_blocks"], model["usable"]) == ("m", 8, False)
    assert model["missing_blocks"] == [[4, 8]] and model["replicas"] == {"0": 4, "1": 4, "2+": 0}
    nodes = {n["peer_id"]: n for n in model["nodes"]}
    assert [(n["start"], n["end"], n["status"]) for n in model["nodes"]] == [(0, 4, "online"), (2, 6, "draining"),
                                                                                (6, 8, "stale")]
    assert nodes[A]["age_s"] == pytest.approx(3) and nodes[A]["connection"] == "direct"
    assert nodes[A]["pings"] == [{"peer_id": B, "rtt_s": 0.004}] and nodes[C]["expires_in_s"] == pytest.approx(-1)
    assert nodes[B]["age_s"] is None and nodes[B]["connection"] is None and nodes[B]["reachable"] is None
    assert doc["totals"]["nodes"] == 2 and doc["totals"]["tokens_served"] == 40
    assert doc["totals"]["blocks_covered"] == 4 and doc["totals"]["nodes_by_status"]["stale"] == 1
    assert doc["updated_at"] == state.updated_at and doc["schema_version"] == 1


def test_metrics_parse_with_prometheus_client():
    hostile = NodeRecord(model="m", start=0, end=8, state=NodeState.ONLINE, public_name='a"b\\c\nd',
                         cache_tokens_left=1234, inference_steps_per_s=10.5)
    state = swarm(NodeView(A, hostile, time.time() + 30, None, ping_s=0.01, probed=True, tokens_served=7),
                  view(B, 0, 4, NodeState.JOINING), crawl_seconds=0.25)
    families = {f.name: f for f in text_string_to_metric_families(metrics_text(state))}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("potluck_nodes", (("model", "m"), ("status", "online")))] == 1
    assert samples[("potluck_nodes", (("model", "m"), ("status", "joining")))] == 1
    assert samples[("potluck_blocks", (("model", "m"), ("replicas", "1")))] == 8
    assert samples[("potluck_model_usable", (("model", "m"),))] == 1
    labels = (("model", "m"), ("name", 'a"b\\c\nd'), ("peer_id", A))
    assert samples[("potluck_node_cache_tokens_left", labels)] == 1234
    assert samples[("potluck_node_inference_steps_per_second", labels)] == 10.5
    assert samples[("potluck_node_tokens_served_total", labels)] == 7
    assert samples[("potluck_crawl_duration_seconds", ())] == 0.25
    assert families["potluck_node_tokens_served"].type == "counter"


def test_merge_keeps_unread_records_until_they_expire_then_marks_them_stale():
    now = 1000.0
    record = NodeRecord(model="m", start=0, end=4, state=NodeState.ONLINE)
    first = merge(SwarmState(), {"m": MODEL}, {"m": {A: (record, now + 5)}}, now, forget_after=60)
    assert first["m"][A].refreshed_at is None and not first["m"][A].stale  # seen on the first crawl: age unknown
    previous = SwarmState(models={"m": MODEL}, nodes=first, crawls=1)
    newer = merge(previous, {"m": MODEL}, {"m": {A: (record, now + 9)}}, now + 1, forget_after=60)
    assert newer["m"][A].refreshed_at == now + 1  # a re-announcement
    lagging = merge(previous, {"m": MODEL}, {"m": {A: (record, now + 2)}}, now + 1, forget_after=60)
    assert lagging["m"][A].expires_at == now + 5  # an older replica's answer does not win
    missed = merge(previous, {}, {}, now + 1, forget_after=60)
    assert not missed["m"][A].stale  # a slow or partial read keeps the record
    assert merge(previous, {}, {}, now + 6, forget_after=60)["m"][A].stale
    assert merge(previous, {}, {}, now + 70, forget_after=60) == {}


def test_parse_entries_keeps_valid_records_with_expiration():
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.utils import ValueWithExpiration

    good = NodeRecord(model="m", start=0, end=2, state=NodeState.ONLINE, protocol=PROTOCOL_VERSION)
    foreign = NodeRecord(model="other", start=0, end=2, state=NodeState.ONLINE, protocol=PROTOCOL_VERSION)
    older = NodeRecord(model="m", start=0, end=2, state=NodeState.ONLINE)  # before records said their protocol
    entries, expires = {}, time.time() + 100
    for block in range(2):
        value = DictionaryDHTValue()
        value.store(A, pack(good), expires + block)
        value.store(B, pack(foreign), expires)
        value.store(C, b"\xc1 not msgpack", expires)
        value.store(C + "x", pack(older), expires)
        entries[block_key("m", block)] = ValueWithExpiration(value, expires + 1)
    found = parse_entries(entries, {"m": MODEL.num_blocks})
    assert found == {"m": {A: (good, expires + 1)}}  # the latest of its copies


def test_a_thousand_synthetic_nodes_render_and_are_served(capsys):
    state = synthetic_state(nodes=1000)

    async def serve() -> tuple[dict, str, bytes, float]:
        server = await HealthServer.create(lambda: state, "127.0.0.1", 0)
        try:
            def get(path: str) -> bytes:
                with urllib.request.urlopen(server.url + path, timeout=30) as response:
                    return response.read()
            began = time.perf_counter()
            body = await asyncio.to_thread(get, "/api/v1/state")
            elapsed = time.perf_counter() - began
            metrics = (await asyncio.to_thread(get, "/metrics")).decode()
            page = await asyncio.to_thread(get, "/")
            return json.loads(body), metrics, page, elapsed
        finally:
            await server.close()

    doc, metrics, page, elapsed = asyncio.run(serve())
    assert sum(len(m["nodes"]) for m in doc["models"]) == 1000
    assert len({f.name for f in text_string_to_metric_families(metrics)}) > 5
    assert b'src="page.js"' in page
    with capsys.disabled():
        print(f"\n1,000 synthetic nodes: /api/v1/state served in {elapsed * 1e3:.0f} ms ({len(json.dumps(doc))} bytes)")


def test_server_refuses_what_it_does_not_serve():
    async def run() -> list[bytes]:
        server = await HealthServer.create(lambda: SwarmState(), "127.0.0.1", 0)
        host, port = server.server.sockets[0].getsockname()[:2]
        answers = []
        try:
            for request in (b"POST /api/v1/state HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                            b"POST /api/v1/state HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", b"GET /nope HTTP/1.1\r\n\r\n",
                            b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"nonsense\r\n\r\n",
                            b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(request)
                answers.append(await reader.readline())
                writer.close()
        finally:
            await server.close()
        return answers

    statuses = [line.split()[1] for line in asyncio.run(run())]
    assert statuses == [b"405", b"405", b"404", b"431", b"400", b"400"]  # a POST with a body is still the wrong method


def test_state_is_encoded_once_per_state_with_an_etag_and_gzip():
    states = [swarm(view(A, 0, 8))]

    async def run() -> list[tuple[int, dict]]:
        server = await HealthServer.create(lambda: states[-1], "127.0.0.1", 0)

        def get(headers: dict) -> tuple[int, dict, bytes]:
            request = urllib.request.Request(server.url + "/api/v1/state", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, dict(response.headers), response.read()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), b""
        try:
            first = await asyncio.to_thread(get, {"Accept-Encoding": "gzip"})
            again = await asyncio.to_thread(get, {"If-None-Match": first[1]["ETag"]})
            states.append(swarm(view(B, 0, 8)))
            changed = await asyncio.to_thread(get, {"If-None-Match": first[1]["ETag"]})
        finally:
            await server.close()
        return [first, again, changed]

    first, again, changed = asyncio.run(run())
    assert first[0] == 200 and first[1]["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(first[2]))["models"][0]["nodes"][0]["peer_id"] == A
    assert again[0] == 304 and "Date" in again[1]
    assert changed[0] == 200 and json.loads(changed[2])["models"][0]["nodes"][0]["peer_id"] == B


class FakeDHT:
    """Answers get_many from a dict of key -> {subkey: (packed value, expiration)}; or hangs. Its
    routing table holds one peer (``peers`` empty: every peer it knew is gone)."""

    def __init__(self, table: dict):
        from types import SimpleNamespace

        self.table, self.hang, self.reads = table, False, []
        self.peers = {"uid": "peer"}
        self.protocol = SimpleNamespace(routing_table=SimpleNamespace(uid_to_peer_id=self.peers))

    async def get_many(self, keys, sufficient_expiration_time=None):
        from hivemind.dht.storage import DictionaryDHTValue
        from hivemind.utils import ValueWithExpiration

        self.reads.append(list(keys))
        if self.hang:
            await asyncio.sleep(3600)
        found = {}
        for key in keys:
            value = DictionaryDHTValue()
            for subkey, (raw, expiration) in self.table.get(key, {}).items():
                value.store(subkey, raw, expiration)
            found[key] = ValueWithExpiration(value, max((e for _, e in self.table.get(key, {}).values()), default=0))
        return found


def test_crawler_reads_in_one_batch_and_keeps_the_last_good_view_when_the_dht_hangs():
    from types import SimpleNamespace

    from potluck.client.health.crawler import Crawler, CrawlSettings
    from potluck.protocol.records import MODEL_INDEX_KEY

    expires = time.time() + 30
    record = pack(NodeRecord(model="m", start=0, end=8, state=NodeState.ONLINE, protocol=PROTOCOL_VERSION))
    table = {MODEL_INDEX_KEY: {A: (pack(MODEL), expires)}}
    table.update({block_key("m", b): {A: (record, expires)} for b in range(8)})
    dht = FakeDHT(table)
    crawler = Crawler(SimpleNamespace(dht=dht, records_rejected=2), CrawlSettings(timeout=0.2))

    async def run() -> tuple[SwarmState, SwarmState, SwarmState, SwarmState]:
        first = await crawler.crawl_once()  # learns the model: index, then its blocks
        second = await crawler.crawl_once()  # one batched read of the index and every block
        dht.hang = True
        slow = await crawler.crawl_once()
        dht.hang = False
        dht.peers.clear()  # every DHT peer gone: the read asks no one and finds nothing
        return first, second, slow, await crawler.crawl_once()

    first, second, slow, alone = asyncio.run(run())
    assert [len(keys) for keys in dht.reads] == [1, 8, 9, 9, 9]
    assert alone.nodes == second.nodes and alone.failures == 2 and "no DHT peer is left" in alone.last_error
    assert first.nodes["m"][A].record.end == 8 and second.crawls == 2
    assert slow.nodes == second.nodes and slow.crawls == 2 and slow.failures == 1
    assert second.records_rejected == 2 and state_json(second)["crawl"]["records_rejected"] == 2
    assert slow.last_error == "TimeoutError" and slow.updated_at == second.updated_at
