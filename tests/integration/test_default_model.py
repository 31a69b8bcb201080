"""`potluck swarm` over the default model (SmolLM2-135M-Instruct), used from Python and the CLI."""
import os
import signal
import subprocess

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from potluck import AutoDistributedModelForCausalLM
from potluck.protocol.checkpoint import resolve_checkpoint

from helpers import potluck_command

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def default_swarm(tmp_path_factory):
    checkpoint = resolve_checkpoint(None)  # converts the GGUF once (about 20 s) on a fresh machine
    log = open(tmp_path_factory.mktemp("swarm") / "swarm.log", "w")
    proc = subprocess.Popen(potluck_command("swarm", "--nodes", "3", "--node-arg=--num-threads=1"),
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()  # blocks until every node is ONLINE, or the swarm exits
        assert line.startswith("POTLUCK_INITIAL_PEERS="), open(log.name).read()[-3000:]
        yield proc, checkpoint, line.strip().split("=", 1)[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_default_model_matches_local(default_swarm):
    proc, checkpoint, maddr = default_swarm
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(checkpoint.path).eval()
    expected = local.generate(ids, max_new_tokens=12, do_sample=False)
    remote = AutoDistributedModelForCausalLM.from_pretrained(initial_peers=[maddr])
    try:
        got = remote.generate(ids, max_new_tokens=12, do_sample=False)
        with torch.no_grad():
            assert (remote(ids).logits - local(ids).logits).abs().max() < 1e-4
    finally:
        remote.swarm_view.swarm.close()
    assert torch.equal(got, expected)
    assert "Paris" in tokenizer.decode(got[0])


def test_generate_command_prints_the_continuation(default_swarm):
    proc, checkpoint, maddr = default_swarm
    result = subprocess.run(potluck_command("generate", PROMPT, "--max-new-tokens", "4"), capture_output=True,
                            text=True, timeout=300, env={**os.environ, "POTLUCK_INITIAL_PEERS": maddr})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(PROMPT) and "Paris" in result.stdout


def test_ctrl_c_stops_every_process(default_swarm):
    proc, checkpoint, maddr = default_swarm
    started = psutil.Process(proc.pid).children(recursive=True)
    assert sum(p.name() == "potluck node" for p in started) == 3  # forks of one server (node.forks), so named
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.parametrize("command", [["node", "--new-swarm"], ["swarm"]])
def test_ctrl_c_while_the_default_model_is_first_converted_stops_at_once(command, tmp_path):
    """The first conversion takes ~25 s; a Ctrl-C does not wait for it (nor leave its files)."""
    proc = subprocess.Popen(potluck_command(*command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "POTLUCK_CACHE": str(tmp_path)}, start_new_session=True)
    try:
        lines = []
        for line in proc.stderr:  # the download (from pip's cache after the first) takes a few seconds
            lines.append(line)
            if "Dequantising" in line:
                break
        assert "Dequantising" in lines[-1], "".join(lines)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        assert proc.wait(5) == (130 if command[0] == "node" else 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()
