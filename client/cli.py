"""Command lines of the user side: `potluck generate` and `potluck chat`."""
from __future__ import annotations

import argparse
import contextlib
import logging

from potluck.protocol.errors import BadRequest
from potluck.protocol.options import COUNT, FRACTION, PORT, number

logger = logging.getLogger(__name__)
SERVE_DRAIN_S = 10.0  # after Ctrl-C, how long `potluck serve` lets the answers being written go on


def add_commands(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="continue a prompt through the swarm")
    _add_model_args(generate)
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument("--max-new-tokens", type=COUNT, default=32, help="tokens to generate")
    generate.add_argument("--temperature", type=number(at_least=0), default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=number(above=0, at_most=1), default=1.0,
                          help="nucleus sampling: the smallest set of tokens "
                          "whose probability reaches P (with --temperature above 0; default: 1, every token)")
    generate.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: random)")
    _add_local_args(generate)
    generate.set_defaults(run=_run_generate)

    chat = commands.add_parser("chat", help="chat with the model through the swarm")
    _add_model_args(chat)
    chat.add_argument("--max-new-tokens", type=COUNT, default=256, help="longest answer per turn")
    chat.add_argument("--max-length", type=COUNT, default=None,
                      help="longest conversation, in tokens (default: the model's positions, at most 4096)")
    chat.add_argument("--temperature", type=number(at_least=0), default=0.0, help="0 = greedy")
    chat.add_argument("--system", default=None, help="system prompt (default: none, or the chat template's own)")
    _add_local_args(chat)
    chat.set_defaults(run=_run_chat)

    _add_route_command(commands)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP API whose model runs through the swarm")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=PORT, default=8000, help="0 picks a free port")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (default: none; it listens on loopback only "
                            "unless --host says otherwise)")
    serve.add_argument("--allowed-origins", nargs="*", default=[], metavar="ORIGIN",
                       help="web pages from these origins may call the API from a browser (CORS), e.g. "
                            "https://chat.example.org, or * for any (default: none)")
    serve.add_argument("--max-active", type=COUNT, default=64, metavar="N",
                       help="requests generating at once, advanced together a token per round; more wait their turn "
                            "in order of arrival (default: 64)")
    _add_local_args(serve)
    serve.set_defaults(run=_run_serve)


def _add_route_command(commands: argparse._SubParsersAction) -> None:
    route = commands.add_parser("route", help="show the swarm's nodes for a model and the chain a session would take")
    _add_model_args(route)
    route.add_argument("--max-length", type=COUNT, default=2048, help="cache tokens the session would reserve")
    route.add_argument("--allow-quantized", action="store_true", help="a chain may use nodes with 8- or 4-bit weights")
    _add_node_dtypes(route)
    route.add_argument("--mix-dtypes", action="store_true",
                       help="a chain may combine nodes of different dtypes (as generate, chat and serve allow with "
                            "the same option)")
    route.set_defaults(run=_run_route)


def _run_route(args: argparse.Namespace) -> int:
    from potluck.protocol.checkpoint import config_id, resolve_checkpoint

    from .swarm_view import SwarmView
    from .routing import explain
    from .transport import SwarmConnection

    initial_peers = _checked(args)
    checkpoint = resolve_checkpoint(args.model, args.model_name)
    swarm = SwarmConnection(initial_peers)
    try:
        view = SwarmView(swarm, checkpoint.name, checkpoint.num_blocks, allow_quantized=args.allow_quantized,
                         mix_dtypes=args.mix_dtypes, config_id=config_id(checkpoint.config),
                         dtypes=frozenset(args.node_dtypes) if args.node_dtypes else None)
        swarm.call(view.refresh())
        swarm.call(view.measure_pings())
        print(f"{checkpoint.name}: {checkpoint.num_blocks} blocks, {len(view.records)} nodes known")
        for peer_id, record in sorted(view.records.items(), key=lambda item: (item[1].start, item[0])):
            ping = view.costs.client_pings.get(peer_id)
            weights = record.dtype if record.quant == "none" else f"{record.dtype}/{record.quant}"
            print(f"  {record.state.value:<8} blocks {record.start:>3}:{record.end:<3} "
                  f"{record.public_name or 'unnamed':<20} {peer_id}  {weights:>13} on {record.device:<4} "
                  f"{record.inference_steps_per_s:8.1f} steps/s  "
                  f"cache {record.cache_tokens_left:>8}  ping {'-' if ping is None else f'{ping * 1e3:.1f} ms'}")
        hops = swarm.call(view.route(cache_tokens=args.max_length))
        print("chosen chain (least expected time per step):")
        for line in explain(hops, view.records, view.costs):
            print("  " + line)
    finally:
        swarm.close()
    return 0


async def _run_serve(args: argparse.Namespace, stop) -> int:
    import asyncio

    import uvicorn

    from .openai_api import create_app
    from .serving import TextGenerator

    listening = _listen(args.host, args.port)  # before the slow part: a busy port fails at once
    try:
        tokenizer, model = await asyncio.to_thread(_load, args)
    except BaseException:
        listening.close()
        raise
    generator = TextGenerator(model, tokenizer, model.swarm_view.model, args.max_active)
    server = _server_without_signals(uvicorn.Config(create_app(generator, args.api_key, args.allowed_origins),
                                                    log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=SERVE_DRAIN_S))
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        while not server.started:
            if serving.done():
                return serving.result() or 1
            await asyncio.sleep(0.05)
        port = listening.getsockname()[1]
        print(f"POTLUCK_OPENAI_BASE_URL=http://{args.host}:{port}/v1", flush=True)
        await asyncio.wait([serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not serving.done():
            logger.info("stopping: answers being written may finish within %.0f s; Ctrl-C again to stop now",
                        SERVE_DRAIN_S)
        server.should_exit = True
        try:
            await serving
        except asyncio.CancelledError:  # a second Ctrl-C: the answers still open end at once, quietly
            asyncio.current_task().uncancel()
            logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # each cut stream's traceback
            server.force_exit = True
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            raise
        finally:
            generator.close()
            await asyncio.to_thread(model.swarm_view.swarm.close)
    return 0


def _server_without_signals(config):
    """uvicorn's server, minus its own Ctrl-C handling: potluck's CLI has its own (a first Ctrl-C
    lets the answers being written finish, a second stops at once), and uvicorn's, raising the
    signal again as it stopped, counted as that second one."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(config)


def _listen(host: str, port: int):
    import socket

    from potluck.protocol.errors import BadRequest

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise BadRequest(f"cannot serve on {host}:{port} ({e.strerror or e}): pass another --port or --host") from None


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """MODEL (positional, as on every command), --model-name and --initial-peers."""
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint folder or HF id in the local HF cache (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model", dest="model_option", default=None, help=argparse.SUPPRESS)  # the old spelling
    parser.add_argument("--model-name", default=None, help="the model's name in the swarm (default: from MODEL)")
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs of peers to join through (default: $POTLUCK_INITIAL_PEERS)")


def _checked(args: argparse.Namespace) -> list[str]:
    """Settle MODEL and return the initial peers, before anything slow: a command without peers
    fails at once, in the CLI's words."""
    from potluck.protocol.network import require_initial_peers

    args.model = args.model or args.model_option
    return require_initial_peers(args.initial_peers)


def _add_node_dtypes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], metavar="DTYPE",
                        help="use only nodes computing in these: float32 for transformers' own float32 tokens "
                             "(default: any, the fastest chain)")


def _add_local_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="where embeddings and lm_head run on this machine: cpu, cuda, cuda:N or mps "
                             "(default: cpu)")
    parser.add_argument("--mix-dtypes", action="store_true",
                        help="let one chain combine nodes of different dtypes (default: each answer keeps to one)")
    _add_node_dtypes(parser)
    parser.add_argument("--allow-quantized", action="store_true",
                        help="also use nodes holding 8- or 4-bit weights: close to the model, not exact "
                             "(default: never)")
    parser.add_argument("--verify", type=FRACTION, default=0.0, metavar="FRACTION",
                        help="check this share of steps against other replicas of each node's blocks and ban nodes "
                             "caught computing wrong, e.g. 0.05 (default: 0; suspicious outputs are always checked)")
    parser.add_argument("--route-wait", type=number(at_least=0), default=60.0, metavar="S",
                        help="when the only node of some blocks fails mid-answer, wait up to S seconds for another "
                             "node to take them before failing (default: 60; 0: fail at once)")


def _load(args: argparse.Namespace, chat: bool = False):
    """The tokenizer, then the swarm model; ``chat``: the tokenizer must have a chat template."""
    from transformers import AutoTokenizer

    from potluck.protocol.checkpoint import resolve_checkpoint

    from .model import AutoDistributedModelForCausalLM

    initial_peers = _checked(args)
    checkpoint = resolve_checkpoint(args.model, args.model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    except (OSError, ValueError) as e:  # no tokenizer files, or only a slow tokenizer's that needs sentencepiece
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadRequest(f"no tokenizer this client can load in {checkpoint.path} ({first}); this command needs "
                         f"the model's tokenizer files (tokenizer.json) beside its weights") from None
    if chat and not getattr(tokenizer, "chat_template", None):
        raise BadRequest(f"{checkpoint.name}'s tokenizer has no chat template (chat_template.jinja), so a conversation "
                         "cannot be put into tokens: use `potluck generate`, or an instruct model")
    model = AutoDistributedModelForCausalLM.from_pretrained(str(checkpoint.path), initial_peers,
                                                            model_name=checkpoint.name, device=args.device,
                                                            mix_dtypes=args.mix_dtypes, verify=args.verify,
                                                            allow_quantized=args.allow_quantized,
                                                            node_dtypes=args.node_dtypes, route_wait=args.route_wait)
    return tokenizer, model


def _sampling(args: argparse.Namespace) -> dict:
    if args.temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": getattr(args, "top_p", 1.0)}


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from .chat import as_text, line_streamer, streaming_apart_from_logs

    args.prompt = as_text(args.prompt)
    if not args.prompt:
        raise BadRequest("the prompt is empty: give the text to continue")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    tokenizer, model = _load(args)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = line_streamer(tokenizer, skip_special_tokens=True)
    try:
        with streaming_apart_from_logs(streamer):  # an error's line, too, below the text streamed so far
            model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, **_sampling(args))
    finally:
        model.swarm_view.swarm.close()
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from potluck.protocol.checkpoint import resolve_checkpoint

    from .chat import chat_length, run_chat

    _checked(args)
    length = chat_length(args.max_length, resolve_checkpoint(args.model, args.model_name).config)  # before joining
    tokenizer, model = _load(args, chat=True)
    run_chat(model, tokenizer, length, args.max_new_tokens, args.system, _sampling(args))
    return 0
