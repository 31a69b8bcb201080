"""The command line as a new contributor meets it: safe network defaults, one-line errors that name
the option to change, Ctrl-C at any moment, a peer id that survives restarts, one CLI."""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from helpers import NOBODY, LocalSwarm, make_tiny_checkpoint, potluck_command
from potluck.cli import build_parser, parse
from potluck.client.transport import SwarmConnection
from potluck.protocol.directory import read_block_records
from potluck.protocol.records import NodeState



def run(*args: str, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(potluck_command(*args), capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_clear_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode not in (0, None), result
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("potluck "), result.stderr[-3000:]
    for word in words:
        assert word in last, last


@pytest.fixture
def no_env_peers(monkeypatch):
    monkeypatch.delenv("POTLUCK_INITIAL_PEERS", raising=False)


def p2pd_of(process: psutil.Process) -> psutil.Process:
    daemons = [c for c in process.children(recursive=True) if c.name() == "p2pd"]
    assert len(daemons) == 1, daemons
    return daemons[0]


def test_dht_and_node_on_loopback_listen_only_there_with_port_mapping_off(tiny_checkpoints, tmp_path):
    swarm = LocalSwarm(tmp_path, node_args=["--num-threads", "1"])
    try:
        swarm.start_dht()  # no flags at all
        peer = swarm.start_nodes(tiny_checkpoints["llama"], ["0:8"])[0]
        for process in (psutil.Process(swarm.children[0].proc.pid), psutil.Process(swarm.nodes[peer].pid)):
            daemon = p2pd_of(process)
            args = daemon.cmdline()
            assert "-natPortMap=0" in args and "-hostAddrs=/ip4/127.0.0.1/tcp/0" in args, args
            listening = [c.laddr.ip for c in daemon.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            assert listening and set(listening) == {"127.0.0.1"}, listening
    finally:
        swarm.stop()


def test_an_initial_peer_that_is_not_a_multiaddr_is_named_with_an_example(no_env_peers):
    commands = [["node", "--blocks", "0:2"], ["dht"], ["generate", "hi"], ["route"], ["health"], ["serve"]]
    with ThreadPoolExecutor() as pool:
        results = list(pool.map(lambda command: run(*command, "--initial-peers", "127.0.0.1:37677", timeout=60),
                                commands))
    for result in results:
        assert_one_clear_line(result, "--initial-peers", "'127.0.0.1:37677'", "/ip4/")


def test_a_node_whose_initial_peer_is_unreachable_says_so(tiny_checkpoints):
    result = run("node", str(tiny_checkpoints["llama"]), "--blocks", "0:2", "--initial-peers", NOBODY)
    assert_one_clear_line(result, "cannot reach", "--initial-peers")


def test_a_model_that_is_not_there(tmp_path, tiny_checkpoints, chat_model):
    no_template = shutil.copytree(chat_model, tmp_path / "no-template")
    (no_template / "chat_template.jinja").unlink()
    with ThreadPoolExecutor() as pool:  # five commands at once: each spends seconds importing
        missing, empty, not_downloaded, no_tokenizer, not_for_chat = pool.map(lambda args: run(*args), [
            ("node", str(tmp_path / "no-such-folder"), "--initial-peers", NOBODY),
            ("generate", str(tmp_path), "hi", "--initial-peers", NOBODY),
            ("chat", "nobody-here/not-a-model", "--initial-peers", NOBODY),
            ("generate", str(tiny_checkpoints["llama"]), "hi", "--initial-peers", NOBODY),  # weights only
            ("chat", str(no_template), "--initial-peers", NOBODY)])
    assert_one_clear_line(missing, "no checkpoint folder", "MODEL")
    assert_one_clear_line(empty, "no config.json")
    assert_one_clear_line(not_downloaded, "hf download nobody-here/not-a-model")
    assert_one_clear_line(no_tokenizer, "no tokenizer", "tokenizer.json")
    assert len(no_tokenizer.stderr.strip().splitlines()) == 1, no_tokenizer.stderr
    assert_one_clear_line(not_for_chat, "no chat template", "potluck generate")  # before joining: not a ValueError


def test_serve_on_a_busy_port_says_which_option_to_change(tiny_checkpoints):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run("serve", str(tiny_checkpoints["llama"]), "--port", str(port), "--initial-peers", NOBODY)
    assert_one_clear_line(result, f"127.0.0.1:{port}", "--port")


def test_an_option_out_of_range_is_one_line_naming_it(tiny_checkpoints):
    model = str(tiny_checkpoints["llama"])
    cases = [("node", model, "--peer-streams", "0"), ("node", model, "--max-memory", "-5"),
             ("node", model, "--cache-gib", "nan"), ("node", model, "--announce-period", "0"),
             ("node", model, "--num-threads", "x"), ("node", model, "--metrics-port", "99999"),
             ("node", model, "--public-name", "two\nlines"), ("swarm", model, "--nodes", "0"),
             ("swarm", model, "--nodes", "9"), ("health", "--refresh", "0"), ("serve", model, "--port", "70000"),
             ("generate", model, "hi", "--max-new-tokens", "0"),
             ("node", model, "--blocks", "0:8", "--cache-gib", "100000"),  # before it joins: more than the RAM
             ("node", model, "--num-blocks", "9")]  # more than the model's 8
    with ThreadPoolExecutor() as pool:
        results = list(pool.map(lambda args: run(*args, *(["--initial-peers", NOBODY] if args[0] != "swarm" else [])),
                                cases))
    for case, result in zip(cases, results):
        option = next(a for a in reversed(case) if a.startswith("--"))
        assert_one_clear_line(result, option)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # not argparse's usage block


def test_an_identity_path_that_is_not_a_key_is_one_line_naming_it(tiny_checkpoints, tmp_path):
    broken = tmp_path / "broken.key"
    broken.write_text("not a key")
    with ThreadPoolExecutor() as pool:
        results = list(pool.map(lambda args: run(*args, "--identity-path", str(broken), "--initial-peers", NOBODY),
                                [("dht",), ("node", str(tiny_checkpoints["llama"]))]))
    for result in results:
        assert_one_clear_line(result, "--identity-path", "not a key")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_model_name_no_node_serves_is_named_with_what_the_swarm_serves(tiny_checkpoints, chat_model,
                                                                        swarm_factory):
    swarm = swarm_factory()
    swarm.start_nodes(tiny_checkpoints["llama"], ["0:8"])
    with ThreadPoolExecutor() as pool:  # generate needs a tokenizer: the chat model's (its name is set)
        results = list(pool.map(lambda args: run(*args, "--initial-peers", *swarm.initial_peers), [
            ("route", str(tiny_checkpoints["llama"]), "--model-name", "nosuch"),
            ("generate", str(chat_model), "hi", "--model-name", "nosuch"),
            ("health", "--host", "10.255.255.1")]))  # and the dashboard on an address this machine does not have
    for result in results[:2]:
        assert_one_clear_line(result, "'nosuch'", f"'{tiny_checkpoints['llama'].name}'", "--model-name")
    assert_one_clear_line(results[2], "--host")



def test_an_empty_prompt_is_named(tiny_checkpoints):
    assert_one_clear_line(run("generate", str(tiny_checkpoints["llama"]), "", "--initial-peers", NOBODY),
                          "prompt is empty")


def test_a_client_command_without_peers_says_so_at_once(no_env_peers):
    began = time.monotonic()
    result = run("generate", "The capital of France is")
    assert_one_clear_line(result, "no initial peers", "--initial-peers")
    assert time.monotonic() - began < 60  # before loading any model (no timing asserted beyond "not stuck")


def test_ctrl_c_while_loading_stops_the_node_before_it_goes_online(tmp_path, monkeypatch, swarm_factory):
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "cache"))  # no cached speed: it measures after loading
    model = make_tiny_checkpoint("llama", tmp_path / "wide-llama", hidden=768, layers=12, vocab=1000, heads=12,
                                 kv_heads=4)
    swarm = swarm_factory()
    process = subprocess.Popen(potluck_command("node", str(model), "--blocks", "0:12", "--num-threads", "1",
                                               "--initial-peers", *swarm.initial_peers),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "loading wide-llama blocks 0:12" in line:
            process.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + process.communicate(timeout=30)[0]
    assert process.returncode == 130, output
    assert "stopping before going ONLINE" in output and "ONLINE: serving" not in output, output[-3000:]
    connection = SwarmConnection(swarm.initial_peers)
    try:
        records = connection.call(read_block_records(connection.dht, "wide-llama", 12))
        assert all(r.state != NodeState.ONLINE for r in records.values()), records
    finally:
        connection.close()


def test_a_node_restarted_under_the_same_name_keeps_its_peer_id(tiny_checkpoints, tmp_path, monkeypatch,
                                                                 swarm_factory):
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path))
    swarm = swarm_factory()
    first = swarm.start_nodes(tiny_checkpoints["llama"], ["0:8"], "--public-name", "carol")[0]
    swarm.nodes[first].send_signal(signal.SIGINT)
    assert swarm.nodes[first].wait(30) == 0
    again = swarm.start_nodes(tiny_checkpoints["llama"], ["0:8"], "--public-name", "carol")[0]
    other = swarm.start_nodes(tiny_checkpoints["llama"], ["0:8"], "--public-name", "dave")[0]
    assert again == first and other != first
    assert [len(list((tmp_path / "identities").glob(f"{name}-*.key"))) for name in ("carol", "dave")] == [1, 1]


def test_version_and_options_after_the_command():
    assert run("--version").stdout.strip().startswith("potluck ")
    parser = build_parser()
    assert parser.parse_args(["node", "--log-level", "debug"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "WARNING", "dht"]).log_level == "WARNING"
    assert parser.parse_args(["generate", "./ckpt", "hi"]).model == "./ckpt"
    assert parser.parse_args(["generate", "hi"]).prompt == "hi"
    for argv in (["generate", "./ckpt", "--max-new-tokens", "5", "hi"],  # was 'unrecognized arguments: hi'
                 ["generate", "--max-new-tokens", "5", "./ckpt", "hi"],
                 ["generate", "./ckpt", "hi", "--max-new-tokens", "5"]):
        args = parse(parser, argv)
        assert (args.model, args.prompt, args.max_new_tokens) == ("./ckpt", "hi", 5), argv
    extra = run("route", "./ckpt", "more")
    assert_one_clear_line(extra, "potluck route: unrecognized arguments: more")


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            assert action.help, f"potluck {name} {action.option_strings or action.dest} has no help"
            switch = action.nargs == 0  # a flag: off unless given (and -h)
            if action.option_strings and not switch and action.help != argparse.SUPPRESS:
                assert "default" in formatter._get_help_string(action), f"potluck {name} {action.option_strings[0]}"
    generate_help = " ".join(commands["generate"].format_help().split())
    assert "--max-new-tokens MAX_NEW_TOKENS tokens to generate (default: 32)" in generate_help  # added by the CLI
    assert "--temperature TEMPERATURE 0 = greedy (default: 0.0)" in generate_help


def test_a_node_that_starts_a_new_swarm_prints_how_to_join_it(tiny_checkpoints):
    proc = subprocess.Popen(potluck_command("node", str(tiny_checkpoints["llama"]), "--new-swarm", "--blocks", "0:8",
                                            "--num-threads", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline().strip()  # once ONLINE
        assert line.startswith("POTLUCK_INITIAL_PEERS=/ip4/127.0.0.1/tcp/"), line
        connection = SwarmConnection(line.split("=", 1)[1].split(","))  # others can join at what it printed
        try:
            records = connection.call(read_block_records(connection.dht, tiny_checkpoints["llama"].name, 8))
            assert {r.state for r in records.values()} == {NodeState.ONLINE}, records
        finally:
            connection.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


def test_a_port_something_listens_on_is_named(tiny_checkpoints):
    with socket.socket() as listener:  # p2pd binds with SO_REUSEPORT: a second peer would share the port
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = f"/ip4/127.0.0.1/tcp/{listener.getsockname()[1]}"
        assert_one_clear_line(run("dht", "--host-maddrs", taken, timeout=60), "already in use", "--host-maddrs")


def test_a_broken_checkpoint_is_named(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama"]
    broken = {name: tmp_path / name for name in ("truncated", "not_json", "more_layers")}
    for folder in broken.values():
        shutil.copytree(source, folder)
    weights = broken["truncated"] / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    (broken["not_json"] / "config.json").write_text('{"model_type": "llama", ')
    config = json.loads((broken["more_layers"] / "config.json").read_text())
    (broken["more_layers"] / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 12}))
    env = {**os.environ, "POTLUCK_CACHE": str(tmp_path / "cache")}
    blocks = {"truncated": "0:8", "not_json": "0:8", "more_layers": "8:12"}
    with ThreadPoolExecutor() as pool:
        results = dict(zip(broken, pool.map(
            lambda name: run("node", str(broken[name]), "--new-swarm", "--blocks", blocks[name], env=env), broken)))
    assert_one_clear_line(results["truncated"], "model.safetensors", "is it complete")
    assert_one_clear_line(results["not_json"], "config.json")
    assert_one_clear_line(results["more_layers"], "no weights of block 8")
    assert not any("OFFLINE" in result.stderr for result in results.values())  # it never was ONLINE


def test_a_swarm_whose_node_fails_at_once_says_it_exited(tiny_checkpoints):
    result = run("swarm", str(tiny_checkpoints["llama"]), "--nodes", "1", "--node-arg=--device=bogus", timeout=120)
    assert result.returncode != 0
    assert "exited with 2" in result.stderr and "not up in" not in result.stderr, result.stderr
    assert result.stderr.count("is not a torch device") == 1, result.stderr  # its own line, not echoed again


def test_a_prompt_after_initial_peers_is_named_with_where_to_put_it(tiny_checkpoints):
    peer = "/ip4/127.0.0.1/tcp/1/p2p/QmRbc4QVACg48GuyPZgU9N8KFqYQ7T5tNp6Vqjrn48X1WT"
    result = run("generate", str(tiny_checkpoints["llama"]), "--initial-peers", peer, "The capital of France is")
    assert_one_clear_line(result, "--initial-peers takes every word after it: give it after the prompt")
