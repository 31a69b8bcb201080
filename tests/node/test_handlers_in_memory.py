"""The node's handlers, hand-off links and announcer, each on its own over in-memory streams."""
import asyncio
import socket

import pytest
import torch
from transformers import DynamicCache

from memory_swarm import peer_id, stream_pair
from potluck.node.announcer import Announcer
from potluck.protocol.bundles import FrameBatcher, unbundle
from potluck.node.compute import ComputeLane
from potluck.node.handlers import BlockServicer, ServingLimits
from potluck.node.links import PushLinks
from potluck.node.sessions import SessionTable
from potluck.node.span import load_span
from potluck.protocol import messages as msg
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.errors import BadRequest, BlocksNotServed, NodeDraining, NodeUnavailable, UnknownSession
from potluck.protocol.records import MODEL_INDEX_KEY, ModelInfo, NodeRecord, NodeState, unpack_node_record
from potluck.protocol.replies import Closed, Followed, HandoffFailed, Opened, Result, parse_reply

HIDDEN = 64


@pytest.fixture
def servicer(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 4, torch.float32)
    describe = lambda: {"peer_id": peer_id("n"), "model": "m", "start": 0, "end": 4, "state": "online"}  # noqa: E731
    servicer = BlockServicer(span, ComputeLane(), SessionTable(1000), ServingLimits(), describe, links=None)
    yield servicer
    servicer.compute.shutdown()


class Client:
    """One inference stream to the servicer, spoken frame by frame."""

    def __init__(self, servicer: BlockServicer):
        (self.reader, self.writer), (node_reader, node_writer) = stream_pair()
        self.serving = asyncio.ensure_future(servicer._inference_stream(None, node_reader, node_writer))

    async def ask(self, request, *tensors):
        await msg.write_frame(self.writer, request.to_meta(), tensors)
        frame = await asyncio.wait_for(msg.read_frame(self.reader), 10)
        return parse_reply(frame), frame.tensors

    async def hang_up(self):
        self.writer.close()
        await asyncio.wait_for(self.serving, 10)


def step_tensors(tokens, start=0):
    return torch.randn(1, tokens, HIDDEN), torch.arange(start, start + tokens).unsqueeze(0)


def test_a_session_opens_steps_rewinds_and_closes(servicer):
    async def talk():
        client = Client(servicer)
        assert (await client.ask(msg.OpenSession("s", 0, 4, 16, 1)))[0] == Opened("s")
        reply, (out,) = await client.ask(msg.Step("s", None, seq=1), *step_tensors(5))
        assert reply == Result(5, 1, "s") and out.shape == (1, 5, HIDDEN)
        reply, _ = await client.ask(msg.Step("s", 3, seq=2), *step_tensors(1, 3))  # rewind to 3, one more
        assert reply == Result(4, 2, "s")
        assert (await client.ask(msg.CloseSession("s")))[0] == Closed("s")
        with pytest.raises(UnknownSession):
            await client.ask(msg.Step("s", None), *step_tensors(1))
        await client.hang_up()

    asyncio.run(talk())
    assert not servicer.sessions.sessions


def test_a_bad_step_changes_nothing_and_a_vanished_client_frees_its_sessions(servicer):
    async def talk():
        client = Client(servicer)
        await client.ask(msg.OpenSession("s", 0, 4, 16, 1))
        await client.ask(msg.Step("s", None), *step_tensors(4))
        with pytest.raises(BadRequest, match="hidden states"):
            await client.ask(msg.Step("s", None), torch.randn(1, 1, HIDDEN + 1), torch.tensor([[4]]))
        reply, _ = await client.ask(msg.Step("s", None), *step_tensors(1, 4))
        assert reply.length == 5  # the bad step appended nothing
        other = Client(servicer)
        with pytest.raises(BadRequest, match="another stream"):
            await other.ask(msg.Step("s", None), *step_tensors(1, 5))
        with pytest.raises(BadRequest, match="another stream"):  # nor can it close someone else's session
            await other.ask(msg.CloseSession("s"))
        assert "s" in servicer.sessions.sessions
        await client.hang_up()
        await other.hang_up()

    asyncio.run(talk())
    assert not servicer.sessions.sessions and servicer.sessions.tokens_left == 1000


def test_a_poisoned_part_of_a_bundle_is_refused_alone(servicer):
    """A bundle's tensors are checked once (``Frame.sane``); when one part holds a NaN or a bad
    position, that part, and only it, is refused."""
    async def talk():
        client = Client(servicer)
        for name in "abcd":
            await client.ask(msg.OpenSession(name, 0, 4, 16, 1))
        hidden, positions = torch.randn(4, 1, HIDDEN), torch.zeros(4, 1, dtype=torch.int64)
        hidden[1, 0, 5] = float("nan")
        positions[3, 0] = -1
        out = FrameBatcher(client.writer)
        for row, name in enumerate("abcd"):
            out.write(msg.Step(name, None, seq=row).to_meta(), [hidden[row:row + 1], positions[row:row + 1]])
        await asyncio.sleep(0)  # one loop turn: one bundle
        answers = {}
        while len(answers) < 4:
            for frame in unbundle(await asyncio.wait_for(msg.read_frame(client.reader), 10)):
                answers[frame.meta.get("session_id")] = msg.error_of(frame) or parse_reply(frame)
        assert isinstance(answers["b"], BadRequest) and "NaN" in str(answers["b"])
        assert isinstance(answers["d"], BadRequest) and "position_ids" in str(answers["d"])
        assert answers["a"] == Result(1, 0, "a") and answers["c"] == Result(1, 2, "c")
        assert servicer.counters["bundles_received"] == 1
        await client.hang_up()

    asyncio.run(talk())


def test_only_the_previous_node_may_push_into_a_session_and_follow_changes_which(servicer):
    async def talk():
        client = Client(servicer)
        await client.ask(msg.OpenSession("s", 0, 4, 16, 1, previous=peer_id("before")))

        async def push(frm: str, start: int):
            (reader, writer), (node_reader, node_writer) = stream_pair()
            serving = asyncio.ensure_future(servicer._serve_stream(
                node_reader, FrameBatcher(node_writer), frm, lambda frame: servicer._push_request(frame, frm),
                counter="pushes_received", concurrent=True))
            await msg.write_frame(writer, msg.Push("s", start, (), seq=start).to_meta(), step_tensors(1, start))
            try:
                return await asyncio.wait_for(msg.read_frame(reader), 0.5)  # an answer here is a refusal
            except asyncio.TimeoutError:
                return None  # taken: the answer went to the client
            finally:
                writer.close()
                await serving

        refused = await push(peer_id("stranger"), 0)
        assert "takes pushes only from the node before it" in str(msg.error_of(refused))
        assert servicer.sessions.get("s").cached == 0  # nothing ran
        assert await push(peer_id("before"), 0) is None
        reply = parse_reply(await asyncio.wait_for(msg.read_frame(client.reader), 10))
        assert reply == Result(1, 0, "s")
        assert (await client.ask(msg.Follow("s", peer_id("newnode"))))[0] == Followed("s")
        assert msg.error_of(await push(peer_id("before"), 1)) is not None  # the old previous node no more
        assert await push(peer_id("newnode"), 1) is None
        assert parse_reply(await asyncio.wait_for(msg.read_frame(client.reader), 10)) == Result(2, 1, "s")
        other = Client(servicer)
        with pytest.raises(BadRequest, match="another stream"):  # only the session's own client says whom to follow
            await other.ask(msg.Follow("s", peer_id("stranger")))
        await client.hang_up()
        await other.hang_up()

    asyncio.run(talk())


class MemoryP2P:
    """What PushLinks uses of hivemind's P2P: streams to a peer's handler, here in memory."""

    def __init__(self, reachable: set[str]):
        self.reachable, self.received, self.opened = reachable, [], 0

    async def call_binary_stream_handler(self, peer, handler):
        if peer.to_base58() not in self.reachable:
            raise ConnectionRefusedError("no route to peer")
        self.opened += 1
        (mine_reader, mine_writer), (their_reader, _) = stream_pair()
        asyncio.ensure_future(self._collect(their_reader))
        return None, mine_reader, mine_writer

    async def _collect(self, reader):
        try:
            while True:
                self.received.append(await msg.read_frame(reader))
        except asyncio.IncompleteReadError:
            pass


def test_a_moving_node_keeps_old_sessions_on_their_span_and_sends_only_those_away(servicer, tiny_checkpoints):
    old = servicer.span
    prompt, following = step_tensors(5), step_tensors(1, 5)
    cache = DynamicCache()
    old(*prompt, None, cache)
    expected = old(*following, None, cache)

    async def talk():
        before = Client(servicer)
        await before.ask(msg.OpenSession("old", 0, 4, 16, 1))
        await before.ask(msg.Step("old", None), *prompt)
        checkpoint = resolve_checkpoint(str(tiny_checkpoints["llama"]))
        servicer.span = load_span(checkpoint, 2, 6, torch.float32, reuse=old.blocks_by_index(range(2, 6)))
        assert servicer.span.blocks[0] is old.blocks[2] and servicer.span.blocks[3] is not old.blocks[3]
        _, (out,) = await before.ask(msg.Step("old", None), *following)  # still on blocks 0:4
        after = Client(servicer)
        with pytest.raises(BlocksNotServed, match="serves 2:6"):
            await after.ask(msg.OpenSession("late", 0, 4, 16, 1))
        assert (await after.ask(msg.OpenSession("new", 2, 6, 16, 1)))[0] == Opened("new")
        await servicer.evict(NodeDraining("moved"), span=old)
        with pytest.raises(NodeDraining, match="moved"):
            parse_reply(await asyncio.wait_for(msg.read_frame(before.reader), 10))
        assert list(servicer.sessions.sessions) == ["new"]  # closed as it was told, before it hangs up
        await before.hang_up()
        reply, _ = await after.ask(msg.Step("new", None), *step_tensors(3))
        await after.hang_up()
        return out, reply

    out, reply = asyncio.run(talk())
    assert torch.equal(out, expected) and reply.length == 3 and not servicer.sessions.sessions


def test_push_links_reuse_one_stream_per_peer_and_report_unreachable_peers():
    near, far = peer_id("near"), peer_id("far")
    p2p = MemoryP2P({near})

    async def push():
        links = PushLinks(p2p)
        for seq in range(3):
            await links.push(near, msg.Push("s", seq, seq=seq).to_meta(), [torch.zeros(1, 1, 2)])
        with pytest.raises(NodeUnavailable) as caught:
            await links.push(far, msg.Push("s", 0).to_meta(), [])
        await asyncio.sleep(0.01)
        links.close()
        return caught.value

    error = asyncio.run(push())
    assert p2p.opened == 1 and [f.meta["seq"] for f in p2p.received] == [0, 1, 2]
    assert error.peer_id == far and "cannot hand off" in str(error)


class MemoryDHT:
    """What the announcer uses of a DHT node: store_many, recorded."""

    def __init__(self):
        self.stores = []

    async def store_many(self, keys, values, expiration, subkeys):
        self.stores.append(list(zip(keys, subkeys, values)))
        return {key: True for key in keys}


def test_the_announcer_stores_every_block_and_the_index_and_comes_back_when_nudged():
    dht, me = MemoryDHT(), peer_id("me")
    record = lambda state: NodeRecord(model="m", start=2, end=5, state=state)  # noqa: E731

    async def announce():
        announcer = Announcer(dht, me, ModelInfo("m", 8, "llama", 64), record, period=30.0)
        assert await announcer.announce(NodeState.ONLINE)
        running = asyncio.ensure_future(announcer.run())
        announcer.nudge()
        await asyncio.sleep(announcer.min_gap + 0.5)
        running.cancel()

    asyncio.run(announce())
    assert len(dht.stores) == 2  # the announcement, then the nudge's, not a period's
    keys = [(key, subkey) for key, subkey, _ in dht.stores[0]]
    assert keys == [("m.2", me), ("m.3", me), ("m.4", me), (MODEL_INDEX_KEY, me)]
    assert unpack_node_record(dht.stores[0][0][2]).state == NodeState.ONLINE


class SocketP2P:
    """What PushLinks uses of hivemind's P2P, over real socket pairs: a peer that stops reading
    fills the socket's buffers, then the stream's own buffer, as a next node that falls behind does."""

    def __init__(self):
        self.peers: list[asyncio.StreamReader] = []  # the far end of each stream opened, in order
        self._far_writers: list[asyncio.StreamWriter] = []  # kept open: a dropped writer closes its socket

    async def call_binary_stream_handler(self, peer, handler):
        mine, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        their_reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
        self.peers.append(their_reader)
        self._far_writers.append(their_writer)
        return None, reader, writer


def test_a_hand_off_waits_for_a_next_node_that_falls_behind_and_reports_one_that_stopped(servicer):
    near = peer_id("near")
    p2p = SocketP2P()
    servicer.links = PushLinks(p2p, connect_timeout=0.3)

    async def talk():
        client = Client(servicer)
        await client.ask(msg.OpenSession("s", 0, 4, 16, 1))
        assert not servicer.links.push_now(near, {}, [])  # no stream to it yet: ``push`` opens one
        await msg.write_frame(client.writer, msg.Step("s", None, (msg.NextHop(near, "n"),), seq=1).to_meta(),
                              step_tensors(5))
        while not p2p.peers:  # the step runs, then its push opens the stream
            await asyncio.sleep(0.01)
        pushed = await asyncio.wait_for(msg.read_frame(p2p.peers[0]), 10)
        assert (pushed.meta["type"], pushed.meta["session_id"], pushed.meta["start_from"]) == ("push", "n", 0)
        assert pushed.tensors[0].shape == (1, 5, HIDDEN)
        filler = msg.Push("n", 5).to_meta(), [torch.zeros(1, 1, 1 << 20)]
        for _ in range(64):  # the next node reads nothing more: its stream backs up
            if not servicer.links.push_now(near, *filler):
                break
            await asyncio.sleep(0)  # the frame leaves at the end of the loop's turn
        assert servicer.links._writers[near].backed_up()
        reply, (out,) = await client.ask(msg.Step("s", None, (msg.NextHop(near, "n"),), seq=2), *step_tensors(1, 5))
        await client.hang_up()
        return reply, out

    reply, out = asyncio.run(talk())
    assert isinstance(reply, HandoffFailed) and reply.peer_id == near and (reply.length, reply.seq) == (6, 2)
    assert out.shape == (1, 1, HIDDEN)  # the client carries on from the next node itself
    assert servicer.counters["handoff_failures"] == 1 and servicer.counters["pushes_sent"] == 1


def test_a_node_nudged_more_often_than_its_period_still_runs_each_period_s_work():
    dht, periods = MemoryDHT(), []

    async def before():
        periods.append(asyncio.get_running_loop().time())

    async def churn():  # a session opens or closes every 0.2 s; the period is 1 s
        announcer = Announcer(dht, peer_id("me"), ModelInfo("m", 8, "llama", 64),
                              lambda state: NodeRecord(model="m", start=0, end=2, state=state), period=1.0)
        announcer.min_gap = 0.1
        running = asyncio.ensure_future(announcer.run(before))
        for _ in range(20):
            announcer.nudge()
            await asyncio.sleep(0.2)
        running.cancel()

    asyncio.run(churn())
    assert len(periods) >= 2, periods  # about one per period of the 4 s or more, not none
    assert all(b - a >= 1.0 for a, b in zip(periods, periods[1:])), periods  # and never more often
    assert len(dht.stores) > len(periods)  # and the nudges' announcements besides
