"""The `potluck` command: one entry point whose subcommands come from the node and client sides.

A subcommand's ``run`` is either a coroutine ``run(args, stop)`` (run on uvloop; the first
Ctrl-C/SIGTERM sets ``stop`` for a graceful exit, a second one cancels it) or a plain function.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import inspect
import logging
import os
import signal
import sys
from typing import NoReturn

from potluck.protocol.errors import PotluckError
from potluck.protocol.options import OneLineParser

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default  # 0 and 0.0 are defaults worth showing; None, False and empty ones are not
        shown = action.option_strings and not (default is None or default is False or default in ([], "")
                                               or default == argparse.SUPPRESS)
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from potluck import __version__
    from potluck.client import cli as client_cli
    from potluck.client.health import cli as health_cli
    from potluck.node import cli as node_cli

    parser = OneLineParser(prog="potluck", description="Run large language models on a volunteer swarm.",
                           formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"potluck {__version__}")
    _add_log_level(parser, "INFO")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    node_cli.add_commands(commands)
    client_cli.add_commands(commands)
    health_cli.add_commands(commands)
    for command in commands.choices.values():
        command.formatter_class = HelpFormatter
        _add_log_level(command, argparse.SUPPRESS)  # also after the command; the later one counts
    parser.commands = commands.choices  # name -> the command's own parser, for its errors
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, positionals after options included: argparse reads `generate MODEL
    --max-new-tokens 5 PROMPT` as PROMPT=MODEL and an unknown PROMPT. Other leftovers are one
    line from the command's own parser."""
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    if args.command == "generate" and args.model is None and len(extras) == 1 and not extras[0].startswith("-"):
        args.model, args.prompt = args.prompt, extras[0]
        return args
    parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extras)}")


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", default=default, choices=LOG_LEVELS, type=str.upper,
                        help="how much to log; DEBUG also shows tracebacks (default: INFO)")


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        if inspect.iscoroutinefunction(args.run):
            return _run_async(args)
        return args.run(args) or 0
    except PotluckError as e:
        print(f"potluck {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the output went to a reader that stopped (`| head`): stop quietly, as on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
        return 141
    except Exception as e:  # a bug or an environment problem: one line, the traceback only with DEBUG
        if args.log_level == "DEBUG":
            raise
        print(f"potluck {args.command}: unexpected {type(e).__name__}: {e} (run with --log-level DEBUG for "
              "the traceback)", file=sys.stderr)
        return 1


def run_and_exit(argv: list[str] | None = None) -> NoReturn:
    """``main``, then exit without Python's teardown of every module it imported: torch's and
    transformers' take 1.5 s of a node's exit on a 2-core machine and do nothing a finished command
    needs. Exit handlers run and output is flushed first (threads still running are not waited
    for: the command is over); a traceback (DEBUG) or an argparse exit leaves as usual."""
    exit_now(main(argv))


def exit_now(code: int) -> NoReturn:
    """Run the exit handlers, flush the output and exit, skipping the modules' teardown."""
    atexit._run_exitfuncs()  # what interpreter shutdown would run first (multiprocessing's, logging's)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # its reader is gone (`| head`)
            code = code or 141
    os._exit(code)


def _run_async(args: argparse.Namespace) -> int:
    import uvloop

    async def supervised() -> int:
        stop = asyncio.Event()
        main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                main_task.cancel()  # second signal: stop now
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            return await args.run(args, stop)
        except asyncio.CancelledError:
            return 130

    return uvloop.run(supervised())
