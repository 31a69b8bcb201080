"""`potluck chat` through a real swarm: a conversation that outgrows --max-length, Ctrl-C during a
reply, and input that is not UTF-8 leave the chat going; the Python API's bad arguments are named,
and a model used after ``close()`` fails at once instead of waiting forever."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoTokenizer

from helpers import NOBODY, potluck_command
from potluck import AutoDistributedModelForCausalLM
from potluck.protocol.errors import BadRequest, PotluckError


@pytest.fixture(scope="module")
def peers(chat_model, swarm_factory):
    swarm = swarm_factory()
    swarm.start_nodes(chat_model, ["0:2", "2:4"])
    return swarm.initial_peers


def chat(model, peers, *args):
    return potluck_command("chat", str(model), *args, "--initial-peers", *peers)


def prompt_length(model, *texts):
    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": text} for text in texts]
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_a_message_that_does_not_fit_is_refused_and_the_chat_goes_on(chat_model, peers):
    room = 3  # a reply of 3 tokens fits after "Hi"
    length = prompt_length(chat_model, "Hi") + room
    result = subprocess.run(chat(chat_model, peers, "--max-length", str(length), "--max-new-tokens", "8"),
                            input=" ".join(["word"] * 100) + "\nHi\n\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("model> ") == 1  # the long message got no reply, the short one did
    refused = [line for line in result.stderr.splitlines() if line.startswith("potluck chat:")]
    assert len(refused) == 1 and "--max-length" in refused[0] and f"over its {length}" in refused[0], result.stderr
    assert f"(the conversation is full: {length} tokens" in result.stderr  # 3 of the 8 tokens asked fitted
    assert "Traceback" not in result.stderr


def test_a_max_length_beyond_the_models_positions_is_one_line(chat_model):
    positions = json.loads((chat_model / "config.json").read_text())["max_position_embeddings"]
    result = subprocess.run(chat(chat_model, [NOBODY], "--max-length", str(positions + 1)), input="Hi\n\n",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "--max-length" in last and f"{positions} positions" in last, last


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on_even_with_input_not_utf8(chat_model, peers):
    process = subprocess.Popen(chat(chat_model, peers, "--max-new-tokens", "150"), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        process.stdin.write(b"Tell me a long story\n")
        process.stdin.flush()
        seen, deadline = b"", time.monotonic() + 120
        while b"model> " not in seen and time.monotonic() < deadline:
            seen += os.read(process.stdout.fileno(), 4096)
        assert b"model> " in seen, seen
        time.sleep(0.5)  # well inside a 150-token reply
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(b"hi \xff\xfe there\n\n", timeout=300)  # bytes that are not UTF-8
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert b"(stopped" in err and (seen + out).count(b"model> ") == 2, (seen + out, err[-2000:])
    assert b"Traceback" not in err


def test_a_model_used_after_close_fails_at_once(chat_model, peers):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(chat_model), " ".join(peers))  # one string: split
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)
    for bad, words in [(dict(max_new_tokens=2.5), "max_new_tokens=2.5"), (dict(max_new_tokens="4"), "max_new_tokens"),
                       (dict(max_new_tokens=0), "at least 1"),
                       (dict(max_new_tokens=99999), "more than this model's 512 positions")]:  # was a NoRoute
        with pytest.raises(BadRequest, match=words):
            model.generate(ids, do_sample=False, **bad)
    with pytest.raises(BadRequest, match="no tokens"):
        model.generate(ids[:, :0], max_new_tokens=2)
    assert model.generate(ids, max_new_tokens=torch.tensor(2), do_sample=False).shape == (1, 5)  # a whole number
    for bad, words in [(dict(dtype="int3"), "dtype 'int3'"), (dict(request_timeout=-1), "request_timeout=-1")]:
        with pytest.raises(BadRequest, match=words):
            AutoDistributedModelForCausalLM.from_pretrained(str(chat_model), peers, **bad)
    model.close()
    began = time.monotonic()
    for call in (lambda: model.generate(ids, max_new_tokens=2, do_sample=False), lambda: model(ids)):
        with pytest.raises(PotluckError, match="closed"):
            call()
    assert time.monotonic() - began < 30  # it waited forever before
    model.close()  # twice: nothing


def test_chat_commands_start_over_set_the_system_prompt_and_unknown_ones_are_named(chat_model, peers):
    def run(*args, text):
        result = subprocess.run(chat(chat_model, peers, "--temperature", "0", "--max-new-tokens", "6", *args),
                                input=text, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        return [reply.split("\n")[0] for reply in result.stdout.split("model> ")[1:]], result.stderr

    replies, err = run(text="Hi\n/reset\n/system Be brief.\n/bogus\n//slash\n/help\n/exit\nnot sent\n")
    assert len(replies) == 2  # to "Hi" and to "/slash"; /exit ended the chat before the last line
    assert "(a new conversation)" in err and "(a new conversation, with that system prompt)" in err
    assert "potluck chat: /bogus is not a command" in err and "/system [TEXT]" in err
    fresh, _ = run("--system", "Be brief.", text="//slash\n\n")
    assert replies[1] == fresh[0]  # after /system, "Hi" and its answer were no longer in the conversation
