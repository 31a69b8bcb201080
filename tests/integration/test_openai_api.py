"""`potluck serve` against a real local swarm, driven by the official `openai` package."""
import asyncio
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

from potluck.client.transport import SwarmConnection
from potluck.protocol import messages as msg

from helpers import potluck_command, start_serve, stop

KEY = "sk-test-potluck"
ORIGIN = "https://chat.example.org"  # a web page allowed to call the API from a browser
@pytest.fixture(scope="module")
def api(chat_model, swarm_factory, tmp_path_factory):
    swarm = swarm_factory()
    peers = swarm.start_nodes(chat_model, ["0:2", "2:4"])
    proc, base_url = start_serve(chat_model, swarm.initial_peers, tmp_path_factory.mktemp("serve"), "--api-key", KEY,
                                 "--allowed-origins", ORIGIN)
    client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)
    connection = SwarmConnection(swarm.initial_peers)
    yield client, base_url, peers, connection
    connection.close()
    stop(proc)


@pytest.fixture(scope="module")
def local(chat_model):
    return AutoModelForCausalLM.from_pretrained(chat_model).eval(), AutoTokenizer.from_pretrained(chat_model)


def local_chat(local, messages, max_tokens, **adjust):
    """Local transformers' greedy answer; ``adjust``: OpenAI's logit_bias and penalties, as ``OpenAIAdjust``."""
    model, tokenizer = local
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    processors = [OpenAIAdjust(ids.shape[1], **adjust)] if adjust else []
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         logits_processor=processors)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class OpenAIAdjust(LogitsProcessor):
    """OpenAI's logit_bias, presence_penalty and frequency_penalty, written from its API reference: a
    token generated c times so far (the prompt not counted) loses c x frequency + presence once c > 0."""

    def __init__(self, prompt_length, logit_bias=None, presence_penalty=0.0, frequency_penalty=0.0):
        self.start, self.bias = prompt_length, {int(k): v for k, v in (logit_bias or {}).items()}
        self.presence, self.frequency = presence_penalty, frequency_penalty

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for token, bias in self.bias.items():
            scores[:, token] += bias
        counts = torch.bincount(input_ids[0, self.start:], minlength=scores.shape[1]).to(scores.dtype)
        scores[0] -= counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
        return scores


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_chat_streamed_equals_whole_equals_local(api, local):
    client = api[0]
    whole = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=24,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed == local_chat(local, MESSAGES, 24)
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens > 5


def test_completions_and_stop_strings(api, local):
    client = api[0]
    plain = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=16, temperature=0)
    text = plain.choices[0].text
    assert plain.object == "text_completion" and len(text) > 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=16, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(api):
    client = api[0]
    runs = [client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=12, temperature=0.9, seed=5)
            for _ in range(2)]
    assert runs[0].choices[0].text == runs[1].choices[0].text


def test_sixteen_concurrent_streams_each_equal_the_request_alone(api, local):
    client, _, peers, connection = api
    prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(16)]
    sampled = {i: dict(temperature=0.8, top_p=0.9, seed=100 + i) for i in range(12, 16)}  # own seeds, own params

    def run(i, results):
        stream = client.chat.completions.create(model="tiny-chat", messages=prompts[i], max_tokens=8 + i % 5,
                                                stream=True, **sampled.get(i, {"temperature": 0}))
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = {}
    for i in sampled:
        run(i, alone)
    together, before = {}, [node_counters(connection, peer) for peer in peers]
    threads = [threading.Thread(target=run, args=(i, together)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [together.get(i) for i in range(12)] == [local_chat(local, prompts[i], 8 + i % 5) for i in range(12)]
    assert {i: together.get(i) for i in sampled} == alone
    bundles = [node_counters(connection, p).get("bundles_received", 0) - b.get("bundles_received", 0)
               for p, b in zip(peers, before)]
    assert all(bundles), bundles  # the gateway's steps reached the first node, and its pushes the second, bundled


def test_logit_bias_and_penalties_give_local_transformers_answer_beside_plain_requests(api, local):
    client = api[0]
    first = local_chat(local, MESSAGES, 1)
    first_id = local[1](first, add_special_tokens=False)["input_ids"][0]
    asked = {"logit_bias": {str(first_id): -100, "300": 4.5}, "presence_penalty": 0.6, "frequency_penalty": 1.3}
    prompts = [[{"role": "user", "content": f"Say {word} again and again."}] for word in ("yes", "no", "maybe")]
    results = {}

    def run(key, messages, extra):
        results[key] = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20,
                                                      temperature=0, **extra).choices[0].message.content

    jobs = [("asked", MESSAGES, asked)] + [(i, m, {}) for i, m in enumerate(prompts)]  # in the same rounds
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results["asked"] == local_chat(local, MESSAGES, 20, **asked)
    assert results["asked"] != local_chat(local, MESSAGES, 20)  # the adjustments changed the answer
    assert [results.get(i) for i in range(3)] == [local_chat(local, m, 20) for m in prompts]


def test_a_token_biased_by_100_is_the_only_one_sampled(api, local):
    answer = api[0].completions.create(model="tiny-chat", prompt=[5, 6, 7], max_tokens=6, temperature=1.2, seed=9,
                                       logit_bias={"300": 100})
    assert answer.choices[0].text == local[1].decode([300] * 6) and answer.usage.completion_tokens == 6


def test_n_choices_each_as_the_request_alone_with_its_seed(api, local):
    client = api[0]
    asked = dict(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0.9, seed=11)
    chunks = list(client.chat.completions.create(**asked, n=3, stream=True, stream_options={"include_usage": True}))
    streamed = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    whole = client.chat.completions.create(**asked, n=3)
    alone = [client.chat.completions.create(**{**asked, "seed": 11 + i}).choices[0].message.content for i in range(3)]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.message.content for c in whole.choices] == [streamed[i] for i in range(3)] == alone
    assert len(set(alone)) > 1  # their own seeds: not the same answer three times
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 36
    assert whole.usage.prompt_tokens == client.chat.completions.create(**asked).usage.prompt_tokens
    greedy = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text and greedy.usage.completion_tokens == 16


def local_logprobs(local, ids, generated):
    """Local transformers' log-probabilities [len(generated), V] of each generated token's position."""
    with torch.no_grad():
        logits = local[0](torch.tensor([ids + generated])).logits[0, len(ids) - 1:-1]
    return torch.log_softmax(logits, -1)


def test_chat_logprobs_are_local_transformers_streamed_or_whole(api, local):
    client, (model, tokenizer) = api[0], local
    asked = dict(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**asked).choices[0]
    streamed = [e for c in client.chat.completions.create(**asked, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    generated = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    expected = local_logprobs(local, ids, generated)
    content = whole.logprobs.content
    assert len(content) == 10 and [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    for entry, token, row in zip(content, generated, expected):
        assert entry.token == tokenizer.decode([token]) and abs(entry.logprob - float(row[token])) < 1e-4
        best = row.topk(3)
        assert [e.token for e in entry.top_logprobs] == [tokenizer.decode([t]) for t in best.indices.tolist()]
        assert all(abs(e.logprob - v) < 1e-4 for e, v in zip(entry.top_logprobs, best.values.tolist()))
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely one
    assert whole.message.content == tokenizer.decode(generated, skip_special_tokens=True)
    joined = b"".join(bytes(entry.bytes) for entry in content).decode("utf-8", "replace")  # parts of characters too
    assert joined.startswith(whole.message.content)


def test_completion_logprobs_in_openais_four_lists(api, local):
    ids, (model, tokenizer) = [5, 6, 7, 8], local
    answer = api[0].completions.create(model="tiny-chat", prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    choice, logprobs = answer.choices[0], answer.choices[0].logprobs
    generated = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    expected = local_logprobs(local, ids, generated)
    assert logprobs.tokens == [tokenizer.decode([t]) for t in generated] and answer.usage.completion_tokens == 8
    rows = zip(logprobs.token_logprobs, logprobs.top_logprobs, generated, expected, strict=True)
    for logprob, top, token, row in rows:
        assert abs(logprob - float(row[token])) < 1e-4
        best = row.topk(2)
        assert list(top) == [tokenizer.decode([t]) for t in best.indices.tolist()]  # greedy: the one drawn is first
        assert all(abs(top[key] - v) < 1e-4 for key, v in zip(top, best.values.tolist()))
    offsets = logprobs.text_offset
    assert len(offsets) == 8 and offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(choice.text)


def open_sessions(connection, peers):
    return sum(connection.call(connection.request(p, msg.INFO_HANDLER, {"type": "info"})).meta["open_sessions"]
               for p in peers)


@pytest.mark.parametrize("choices", [1, 3])
def test_dropped_stream_frees_its_sessions(api, choices):
    client, base_url, peers, connection = api
    assert open_sessions(connection, peers) == 0
    body = {"model": "tiny-chat", "prompt": "A long story:", "max_tokens": 480, "temperature": 0, "stream": True,
            "n": choices}
    with httpx.stream("POST", f"{base_url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert open_sessions(connection, peers) == 2 * choices  # one per hop and choice, while the answer streams
    for _ in range(100):  # the connection is closed: the server stops generating and closes the session
        if open_sessions(connection, peers) == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert open_sessions(connection, peers) == 0


@pytest.mark.parametrize("choices", [1, 3])
def test_a_whole_answer_whose_client_left_frees_its_sessions_too(api, choices):
    client, base_url, peers, connection = api
    body = {"model": "tiny-chat", "prompt": "A long story:", "max_tokens": 480, "temperature": 0, "n": choices}
    before = node_tokens(connection, peers[0])
    with pytest.raises(httpx.TimeoutException):  # the client gives up long before the answer is done
        httpx.post(f"{base_url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0)
    for _ in range(200):
        if open_sessions(connection, peers) == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert open_sessions(connection, peers) == 0
    assert node_tokens(connection, peers[0]) - before < 400 * choices  # it left: each choice would have made 480


def scrape(base_url, key=KEY):  # a serve without --api-key takes any
    return httpx.get(f"{base_url.removesuffix('/v1')}/metrics", headers={"Authorization": f"Bearer {key}"})


def metric_values(text):
    """Prometheus text as {name{labels}: value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_show_what_the_gateway_is_doing_and_has_done(api):
    client, base_url, peers, connection = api
    assert scrape(base_url, "sk-wrong").status_code == 401  # behind the API key, as every path
    before = metric_values(scrape(base_url).text)
    assert before['potluck_serve_info{max_active="64",model="tiny-chat"}'] == 1
    client.completions.create(model="tiny-chat", prompt=[5, 6, 7], max_tokens=6, temperature=0)
    body = {"model": "tiny-chat", "prompt": "A long story:", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        lines = response.iter_lines()  # kept: a reader that is dropped closes the stream
        assert next(line for line in lines if line.startswith("data:"))
        during = metric_values(scrape(base_url).text)
    for _ in range(100):  # the stream's client left: its request leaves the loop
        after = metric_values(scrape(base_url).text)
        if after["potluck_serve_requests_active"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert during["potluck_serve_requests_active"] == 1 and during["potluck_serve_requests_waiting"] == 0
    assert after["potluck_serve_requests_active"] == 0

    def grew(name):
        return after[name] - before.get(name, 0)

    assert grew('potluck_serve_requests_ended_total{outcome="answered"}') == 1
    assert grew('potluck_serve_requests_ended_total{outcome="left"}') == 1
    assert grew('potluck_serve_requests_ended_total{outcome="failed"}') == 0
    assert grew("potluck_serve_tokens_generated_total") >= 7  # the 6, and the stream's first at least
    assert grew("potluck_serve_prompt_tokens_total") >= 3 + 4
    assert grew("potluck_serve_round_rows_total") >= grew("potluck_serve_rounds_total") >= 5


def test_a_body_larger_than_any_prompt_that_fits_is_refused_before_it_is_read(api):
    client, base_url, peers, connection = api
    headers = {"Authorization": f"Bearer {KEY}"}
    huge = {"model": "tiny-chat", "prompt": "a" * (3 << 20), "max_tokens": 5}  # 3 MiB of text: 512 positions
    refused = httpx.post(f"{base_url}/completions", json=huge, headers=headers, timeout=60)
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"

    def chunks():  # the same, sent without its length
        yield b'{"model": "tiny-chat", "max_tokens": 5, "prompt": "'
        for _ in range(48):
            yield b"a" * (64 << 10)
        yield b'"}'

    refused = httpx.post(f"{base_url}/completions", content=chunks(), timeout=60,
                         headers={**headers, "Content-Type": "application/json"})
    assert refused.status_code == 413
    assert client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-5", "messages": MESSAGES}, 404, "model"),
    ({"model": "tiny-chat", "messages": MESSAGES, "temperature": 7}, 400, "temperature"),
    ({"model": "tiny-chat", "messages": MESSAGES, "n": 17}, 400, "n"),
    ({"model": "tiny-chat", "messages": MESSAGES, "n": 0}, 400, "n"),
    ({"model": "tiny-chat", "messages": []}, 400, "messages"),
    ({"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
])
def test_bad_requests_get_openai_errors(api, body, status, param):
    base_url = api[1]
    response = httpx.post(f"{base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


@pytest.mark.parametrize("path, body, param", [
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [5, 49152]}, "prompt"),  # past the vocabulary
    ("completions", {"prompt": ["one", "two"]}, "prompt"),
    ("completions", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
    ("completions", {"prompt": "Hi", "echo": True}, "echo"),
    ("completions", {"prompt": "Hi", "best_of": 3}, "best_of"),
    ("completions", {"prompt": "Hi", "max_tokens": 600}, "max_tokens"),  # past the model's 512 positions
    ("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": MESSAGES, "frequency_penalty": 2.5}, "frequency_penalty"),
    ("chat/completions", {"messages": MESSAGES, "presence_penalty": "much"}, "presence_penalty"),
    ("chat/completions", {"messages": MESSAGES, "logit_bias": {"x": 1}}, "logit_bias"),
    ("chat/completions", {"messages": MESSAGES, "logit_bias": {"5": 101}}, "logit_bias"),
    ("chat/completions", {"messages": MESSAGES, "logit_bias": {"5": 1, "05": 2}}, "logit_bias"),
    ("chat/completions", {"messages": MESSAGES, "logit_bias": {"49152": 1}}, "logit_bias"),  # past the vocabulary
    ("completions", {"prompt": "Hi", "logit_bias": [1, 2]}, "logit_bias"),
    ("completions", {"prompt": "Hi", "logprobs": False}, "logprobs"),  # not 0: no number
    ("completions", {"prompt": "Hi", "top_logprobs": 2}, "top_logprobs"),  # chat's
    ("chat/completions", {"messages": MESSAGES, "logprobs": "yes"}, "logprobs"),
    ("chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
    ("chat/completions", {"messages": MESSAGES, "n": "2"}, "n"),
    ("chat/completions", {"messages": MESSAGES, "presence_penalty": True}, "presence_penalty"),
    ("chat/completions", {"messages": MESSAGES, "logit_bias": {"5": True}}, "logit_bias.5"),
    ("chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 20, "n": 16, "max_tokens": 400},
     "max_tokens"),  # 134,400 log-probabilities
    ("chat/completions", {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),  # not ...content.str
    ("chat/completions", {"messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
    ("chat/completions", {"messages": MESSAGES, "functions": [{"name": "f"}]}, "functions"),
    ("chat/completions", {"messages": MESSAGES, "modalities": ["text", "audio"]}, "modalities"),
    ("chat/completions", {"messages": MESSAGES, "stop": ""}, "stop"),
    ("chat/completions", {"messages": MESSAGES, "stop": "Q" * 257}, "stop"),
    ("chat/completions", {"messages": MESSAGES, "seed": 1 << 64}, "seed"),
    ("chat/completions", {"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),  # fills 512
])
def test_what_the_server_cannot_do_is_a_400_naming_the_parameter(api, path, body, param):
    response = httpx.post(f"{api[1]}/{path}", json={"model": "tiny-chat", **body},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param) and error["type"] == "invalid_request_error"


def test_requests_that_are_not_json_or_go_nowhere_get_openai_errors(api):
    base_url, headers = api[1], {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    broken = httpx.post(f"{base_url}/completions", content=b'{"model": "tiny-chat",', headers=headers)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    for body, param in ((b'{"model": "tiny-chat", "prompt": "a\\ud800b"}', "prompt"),  # JSON can carry a lone surrogate
                        (b'{"model": "tiny-chat", "prompt": "a", "stop": ["\\udfff"]}', "stop")):
        surrogate = httpx.post(f"{base_url}/completions", content=body, headers=headers)
        assert surrogate.status_code == 400 and surrogate.json()["error"]["param"] == param, surrogate.text
    assert "not valid JSON" in broken.json()["error"]["message"] and broken.json()["error"]["param"] is None
    latin = httpx.post(f"{base_url}/completions", content='{"prompt": "caf\u00e9"}'.encode("latin-1"), headers=headers)
    assert latin.status_code == 400 and latin.json()["error"]["code"] == "invalid_json", latin.text
    nowhere = httpx.post(f"{base_url}/embeddings", json={"model": "tiny-chat"}, headers=headers)
    assert nowhere.status_code == 404 and "/v1/chat/completions" in nowhere.json()["error"]["message"]
    wrong_method = httpx.get(f"{base_url}/completions", headers=headers)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    assert wrong_method.headers["allow"] == "POST"
    form = httpx.post(f"{base_url}/completions", content=b"model=tiny-chat", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 400 and "JSON object" in form.json()["error"]["message"]
    assert api[0].models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError):
        api[0].models.retrieve("gpt-5")


def test_a_bad_prompt_leaves_the_requests_being_served_alone(api, local):
    client, base_url = api[0], api[1]
    expected = local_chat(local, MESSAGES, 64)
    stream = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=64, temperature=0,
                                            stream=True)
    text = [next(c for c in stream if c.choices and c.choices[0].delta.content).choices[0].delta.content]
    for prompt in ("", [], [49152]):  # refused while the stream above is in the decoding loop
        response = httpx.post(f"{base_url}/completions", json={"model": "tiny-chat", "prompt": prompt},
                              headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 400
    text += [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(text) == expected


def test_top_p_zero_is_accepted_as_openai_does_and_picks_the_most_likely_token(api):
    client = api[0]
    texts = [client.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=6, **sampling).choices[0].text
             for sampling in ({"temperature": 0.9, "top_p": 0, "seed": 3}, {"temperature": 0})]
    assert texts[0] == texts[1]


def test_a_temperature_too_small_to_divide_by_is_greedy_and_harms_no_one(api, local):
    client = api[0]
    expected = local_chat(local, MESSAGES, 48)
    stream = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=48, temperature=0,
                                            stream=True)
    text = [next(c for c in stream if c.choices and c.choices[0].delta.content).choices[0].delta.content]
    tiny = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=1e-45)
    assert tiny.choices[0].message.content == local_chat(local, MESSAGES, 8)  # logits / 1e-45 would be inf
    text += [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(text) == expected


def test_usage_streams_as_openai_sends_it_and_nulls_mean_defaults(api, local):
    client, base_url = api[0], api[1]
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 6
    plain = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, temperature=0,
                                                stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"
    nulls = {"max_tokens": None, "temperature": 0, "top_p": None, "n": None, "stream": None, "seed": None}
    response = httpx.post(f"{base_url}/chat/completions", json={"model": "tiny-chat", "messages": MESSAGES, **nulls},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()  # no limit given: up to the end of the text or of the model's 512 positions
    assert answer["usage"]["completion_tokens"] + answer["usage"]["prompt_tokens"] <= 512
    assert answer["choices"][0]["message"]["content"].startswith(local_chat(local, MESSAGES, 24))


def test_token_prompts_text_parts_and_max_completion_tokens_mean_what_they_do_in_openai(api, local):
    client, tokenizer = api[0], local[1]
    text = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=8, temperature=0)
    ids = tokenizer("Once upon a time")["input_ids"]
    for prompt in (ids, [ids]):
        by_ids = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=8, temperature=0)
        assert by_ids.choices[0].text == text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"][:4]},
                                              {"type": "text", "text": m["content"][4:]}]} for m in MESSAGES]
    answer = client.chat.completions.create(model="tiny-chat", messages=parts, max_completion_tokens=3,
                                            max_tokens=30, temperature=0)
    assert answer.usage.completion_tokens == 3 and answer.choices[0].message.content == local_chat(local, MESSAGES, 3)


def test_wrong_api_key(api):
    response = httpx.post(f"{api[1]}/chat/completions", json={"model": "tiny-chat", "messages": MESSAGES},
                          headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    for body in (b'{"model": "tiny-chat",', b"x" * (2 << 20)):  # refused for the key before the body is looked at
        response = httpx.post(f"{api[1]}/completions", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{api[1]}/embeddings", json={}).status_code == 401  # nor where it goes
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api[1], api_key="wrong", max_retries=0).models.list()


def test_a_browser_page_from_an_allowed_origin_may_call_the_api_and_no_other(api):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{api[1]}/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{api[1]}/chat/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    answer = httpx.post(f"{api[1]}/chat/completions",
                        json={"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2},
                        headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}, timeout=60)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.get(f"{api[1]}/models", headers={"Origin": ORIGIN})  # the key is still asked for
    assert refused.status_code == 401


def test_models_lists_the_served_model(api):
    assert [m.id for m in api[0].models.list().data] == ["tiny-chat"]


def test_missing_blocks_are_a_503_naming_them(chat_model, swarm_factory, tmp_path_factory):
    swarm = swarm_factory()
    swarm.start_nodes(chat_model, ["0:2"])
    proc, base_url = start_serve(chat_model, swarm.initial_peers, tmp_path_factory.mktemp("serve503"))
    try:
        response = httpx.post(f"{base_url}/chat/completions", json={"model": "tiny-chat", "messages": MESSAGES},
                              timeout=60)
        assert response.status_code == 503
        assert "blocks 2:4" in response.json()["error"]["message"]
        listed = httpx.get(f"{base_url}/models", headers={"Origin": ORIGIN})
        assert listed.json()["data"] == []
        assert "access-control-allow-origin" not in listed.headers  # no CORS unless asked
        retrieved = httpx.get(f"{base_url}/models/tiny-chat", timeout=60)  # was a 200
        assert retrieved.status_code == 503 and "blocks 2:4" in retrieved.json()["error"]["message"]
    finally:
        stop(proc)


def node_counters(connection, peer):
    return connection.call(connection.request(peer, msg.INFO_HANDLER, {"type": "info"})).meta["counters"]


def node_tokens(connection, peer):
    return node_counters(connection, peer).get("tokens", 0)


def test_max_active_caps_the_requests_generating_at_once_and_the_rest_wait_their_turn(chat_model, swarm_factory,
                                                                                     tmp_path_factory, local):
    swarm = swarm_factory()
    peers = swarm.start_nodes(chat_model, ["0:4"])
    proc, base_url = start_serve(chat_model, swarm.initial_peers, tmp_path_factory.mktemp("serve"), "--max-active", "2")
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    connection = SwarmConnection(swarm.initial_peers)
    prompts = [f"Tale number {i}:" for i in range(5)]
    answers, most, done = {}, [], threading.Event()

    def run(i):
        answers[i] = client.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=40,
                                               temperature=0).choices[0].text

    def watch():
        while not done.is_set():
            most.append(open_sessions(connection, peers))

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
        watcher = threading.Thread(target=watch)
        watcher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        done.set()
        watcher.join(30)
        waiting_choices_stream_and_leavers_cost_nothing(base_url, local[1])
    finally:
        connection.close()
        stop(proc)
    model, tokenizer = local
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
        assert answers.get(i) == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert max(most) == 2 and len(most) > 10  # two at a time on the node (one hop each), never more


def waiting_choices_stream_and_leavers_cost_nothing(base_url, tokenizer):
    """With 2 places: an n=2 stream streams its first choice while its second waits for a place;
    a request whose client leaves while it waits for a place is never generated."""
    story, wait = "A long story:", "Hi " * 12  # prompts of different lengths: who was admitted shows in the count

    def long_stream(n=1):
        body = {"model": "tiny-chat", "prompt": story, "max_tokens": 300, "temperature": 0, "stream": True, "n": n}
        return httpx.stream("POST", f"{base_url}/completions", json=body, timeout=60)

    before = metric_values(scrape(base_url).text)
    with long_stream() as busy, long_stream(n=2) as both:
        lines = busy.iter_lines()  # kept: a reader that is dropped closes the stream
        assert next(line for line in lines if line.startswith("data:"))
        pieces = both.iter_lines()
        assert '"index": 0' in next(line for line in pieces if line.startswith("data:"))
        during = metric_values(scrape(base_url).text)
        assert during["potluck_serve_requests_active"] == 2 and during["potluck_serve_requests_waiting"] == 1
        with pytest.raises(httpx.TimeoutException):  # no place for its 3 choices: its client gives up
            httpx.post(f"{base_url}/completions", json={"model": "tiny-chat", "prompt": wait, "max_tokens": 200,
                                                        "n": 3}, timeout=1.0)
        asyncio.run(asyncio.sleep(1.0))  # the server sees it gone (it looks every 0.5 s)
    for _ in range(100):
        after = metric_values(scrape(base_url).text)
        if after["potluck_serve_requests_active"] == after["potluck_serve_requests_waiting"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    admitted = after["potluck_serve_prompt_tokens_total"] - before["potluck_serve_prompt_tokens_total"]
    story_tokens = len(tokenizer(story)["input_ids"])
    assert admitted in (2 * story_tokens, 3 * story_tokens)  # the streams' choices only: never the one that left
    ended = {how: after[f'potluck_serve_requests_ended_total{{outcome="{how}"}}']
             - before[f'potluck_serve_requests_ended_total{{outcome="{how}"}}'] for how in ("answered", "left")}
    assert sum(ended.values()) == 6 and ended["left"] >= 3


def test_chat_command_streams_and_sends_only_new_tokens(api, chat_model, local):
    client, base_url, peers, connection = api
    before = node_tokens(connection, peers[0])
    result = subprocess.run(potluck_command("chat", "--model", str(chat_model), "--max-new-tokens", "8",
                                            "--initial-peers", *connection.initial_peers),
                            input="Hi there\nTell me more\n\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("model> ") == 2
    tokenizer = local[1]
    first = [{"role": "user", "content": "Hi there"}]
    reply = local_chat(local, first, 8)
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Tell me more"}]
    length = len(tokenizer.apply_chat_template(second, add_generation_prompt=True, return_dict=True)["input_ids"])
    sent = node_tokens(connection, peers[0]) - before
    # turn 1: its prompt and 7 steps; turn 2: only what the nodes did not hold, and 7 steps
    assert length < sent <= length + 2 * 7 + 4


@pytest.mark.parametrize("twice", [False, True])
def test_ctrl_c_lets_answers_finish_and_a_second_one_stops_at_once_quietly(api, chat_model, tmp_path, twice):
    proc, base_url = start_serve(chat_model, api[3].initial_peers, tmp_path)
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
    started, outcomes = threading.Event(), []

    def request():
        try:
            stream = client.completions.create(model="tiny-chat", prompt="A long story:", max_tokens=300,
                                               temperature=0, stream=True)
            chunks = 0
            for _ in stream:
                chunks += 1
                started.set()
            outcomes.append(chunks)
        except Exception as e:  # noqa: BLE001 - a cut stream is what a second Ctrl-C gives
            outcomes.append(e)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGINT)
    if twice:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
    code = proc.wait(60)
    for thread in threads:
        thread.join(60)
    log = (tmp_path / "serve.log").read_text()
    assert "stopping: answers being written may finish" in log
    assert "Traceback" not in log and "Exception in" not in log, log[-3000:]
    if twice:
        assert code == 130
    else:  # the answers in flight were written to the end
        assert code == 0 and all(isinstance(o, int) and o >= 300 for o in outcomes), outcomes
