"""task=serve through the official openai client: OpenAI's shapes, every field working or a 400
naming it, streaming, concurrency, disconnects, auth, CORS, body limit, tokenize, metrics.

One server for the module (async scheduling on, as on a GPU; the library comparisons run sync).
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from framework import SamplingParams, compose
from framework.engine.detokenizer import IncrementalDecoder
from framework.llm import LLM
from framework.serve.server import OpenAIServer
from framework.serve.text_stream import TextStream

KEY = "sk-test"
ORIGIN = "http://allowed.example"
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def server():
    cfg = compose(["cache.cpu_kvcache_space_gib=0.1", "cache.async_scheduling=true", "task=serve", "task.port=0",
                   f"task.api_key={KEY}", f"task.cors_origins=[{ORIGIN}]", f"task.max_body_bytes={BODY_LIMIT}"])
    llm = LLM(cfg)
    srv = OpenAIServer(llm, cfg.task)
    yield srv, llm
    srv.shutdown()
    llm.shutdown()


@pytest.fixture(scope="module")
def client(server):
    host, port = server[0].address
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server):
    return server[1].config.model.path


def raw(srv, method, path, body=None, headers=None):
    """(status, headers, parsed body) of a plain HTTP call; `body` bytes go as they are."""
    host, port = srv.address
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = response.read()
            status, got = response.status, response.headers
    except urllib.error.HTTPError as err:
        payload, status, got = err.read(), err.code, err.headers
    try:
        return status, got, json.loads(payload)
    except ValueError:
        return status, got, payload.decode()


def solo(client, model, prompt, **kw):
    return client.completions.create(model=model, prompt=prompt, temperature=0, **kw).choices[0]


# --- the basics -----------------------------------------------------------------------------
def test_completions_match_the_library(client, model):
    got = client.completions.create(model=model, prompt="The for statement", max_tokens=12, temperature=0)
    with LLM(compose(["cache.cpu_kvcache_space_gib=0.1"])) as library:  # the server's engine is busy serving
        expected = library.generate("The for statement", SamplingParams(max_tokens=12, temperature=0))[0]
    assert got.choices[0].text == expected.text and got.choices[0].finish_reason == expected.finish_reason
    assert got.usage.completion_tokens == len(expected.token_ids) and got.object == "text_completion"


def test_chat_completion(client, model):
    got = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is a generator?"}],
                                         max_tokens=8, temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == 8 and got.choices[0].message.content
    parts = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "a generator?"}]}])
    plain = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What is a generator?"}])
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_models(client, model, server):
    assert [m.id for m in client.models.list().data] == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-nothing")
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nothing", prompt="x", max_tokens=2)
    status, _, body = raw(server[0], "GET", "/v1/nothing")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


# --- every field works or is a 400 naming it ------------------------------------------------
BAD = [({"seed": 2 ** 64}, "seed"), ({"temperature": -1}, "temperature"), ({"stop": [1]}, "stop"),
       ({"top_p": 0}, "top_p"), ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": "ten"}, "max_tokens"),
       ({"n": 0}, "n"), ({"presence_penalty": 3}, "presence_penalty"), ({"logit_bias": {"5": 1}}, "logit_bias"),
       ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"frobnicate": 1}, "frobnicate"),
       ({"stream": "yes"}, "stream"), ({"prompt": 5}, "prompt"), ({"prompt": []}, "prompt"),
       ({"prompt": "x" * 3000}, "prompt"), ({"prompt": [1, 99999]}, "prompt"),
       ({"stop_token_ids": [99999]}, "stop_token_ids"), ({"logprobs": 2, "echo": True}, "echo"),
       ({"min_tokens": 20, "max_tokens": 4}, "min_tokens"), ({"stream_options": {"include_usage": True}},
                                                               "stream_options")]


@pytest.mark.parametrize("fields,param", BAD, ids=[p for _, p in BAD])
def test_bad_completion_fields_are_400_naming_them(server, fields, param):
    status, _, body = raw(server[0], "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, **fields})
    assert status == 400 and body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error"


CHAT_BAD = [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
            ({"response_format": {"type": "json_object"}}, "response_format"),
            ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
            ({"max_completion_tokens": 0}, "max_completion_tokens"),
            ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"), ({"messages": []}, "messages"),
            ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                         {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
             "messages[0].content[1]")]


@pytest.mark.parametrize("fields,param", CHAT_BAD, ids=[p for _, p in CHAT_BAD])
def test_bad_chat_fields_are_400_naming_them(server, fields, param):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    status, _, reply = raw(server[0], "POST", "/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == param, reply


@pytest.mark.parametrize("payload,param", [(b'{"prompt": "x", "temperature": NaN}', "temperature"),
                                           (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
                                           (b'{"prompt": "x",', None)])
def test_non_finite_numbers_and_broken_json(server, payload, param):
    status, _, body = raw(server[0], "POST", "/v1/completions", payload)
    assert status == 400 and body["error"]["param"] == param, body


def test_bad_requests_do_not_disturb_a_concurrent_good_one(client, model, server):
    expected = solo(client, model, "The import statement", max_tokens=24).text
    bad = [{"prompt": "x", "seed": 2 ** 64}, {"prompt": "x", "temperature": 1e-300, "max_tokens": 3},
           {"prompt": "x", "stop": [1]}, {"prompt": "x", "temperature": "hot"}]
    with ThreadPoolExecutor(len(bad) + 1) as pool:
        good = pool.submit(solo, client, model, "The import statement", max_tokens=24)
        replies = list(pool.map(lambda b: raw(server[0], "POST", "/v1/completions", b), bad))
        assert good.result().text == expected
    assert [s for s, _, _ in replies] == [400, 200, 400, 400]  # a tiny temperature is greedy, not an error


# --- what works ------------------------------------------------------------------------------
def test_n_choices_and_seeds(client, model):
    greedy = client.completions.create(model=model, prompt="Comparisons", max_tokens=6, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2] and len({c.text for c in greedy.choices}) == 1
    assert greedy.usage.completion_tokens == 18
    sampled = client.completions.create(model=model, prompt="Comparisons", max_tokens=12, seed=5, n=3)
    again = client.completions.create(model=model, prompt="Comparisons", max_tokens=12, seed=5, n=3)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert len({c.text for c in sampled.choices}) > 1
    two = client.completions.create(model=model, prompt=["Comparisons", "The pass statement"], max_tokens=4,
                                    temperature=0, n=2)
    assert [c.text for c in two.choices][::2] == [solo(client, model, p, max_tokens=4).text
                                                  for p in ["Comparisons", "The pass statement"]]


def test_logprobs_and_echo(client, model, server):
    got = client.completions.create(model=model, prompt="The for statement", max_tokens=5, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == got.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(t) == 3 and max(t.values()) == pytest.approx(chosen, abs=1e-5)
               for t, chosen in zip(lp.top_logprobs, lp.token_logprobs))  # greedy picks the likeliest
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    echo = client.completions.create(model=model, prompt="The for statement", max_tokens=5, temperature=0, echo=True)
    assert echo.choices[0].text == "The for statement" + got.choices[0].text
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
               for c in content)


def test_penalties_and_min_tokens_change_the_output(client, model):
    plain = solo(client, model, "The while statement", max_tokens=24).text
    for fields in ({"presence_penalty": 1.5}, {"frequency_penalty": 1.5}, {"extra_body": {"repetition_penalty": 1.8}}):
        assert solo(client, model, "The while statement", max_tokens=24, **fields).text != plain, fields
    first = plain[:3]
    stopped = solo(client, model, "The while statement", max_tokens=24, stop=[first])
    assert stopped.text == "" and stopped.finish_reason == "stop"  # a stop string at the very start is removed
    held = solo(client, model, "The while statement", max_tokens=24, stop=[first], extra_body={"min_tokens": 24})
    assert held.text == plain and held.finish_reason == "length"


# --- streaming ---------------------------------------------------------------------------------
def test_streamed_completion_adds_up_to_the_plain_one(client, model):
    plain = solo(client, model, "The for statement", max_tokens=12)
    chunks = list(client.completions.create(model=model, prompt="The for statement", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    usage = chunks.pop()
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == plain.text and len([t for t in texts if t]) > 1
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert len({c.id for c in chunks}) == 1


def test_streamed_chat_with_n_and_logprobs(client, model):
    messages = [{"role": "user", "content": "What is a generator?"}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, n=2, logprobs=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == plain.choices[0].message.content
        assert mine[-1].finish_reason == plain.choices[0].finish_reason
        assert sum(len(c.logprobs.content) for c in mine if c.logprobs) == 10


def test_streamed_stop_string_does_not_leak(client, model):
    text = solo(client, model, "The while statement", max_tokens=24).text
    stop = text[6:14]  # spans several tokens: their first ones come before the stop is complete
    plain = solo(client, model, "The while statement", max_tokens=24, stop=["never there", stop])
    assert plain.finish_reason == "stop" and plain.text == text[:text.find(stop)]
    chunks = list(client.completions.create(model=model, prompt="The while statement", max_tokens=24, temperature=0,
                                            stop=["never there", stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.text and chunks[-1].choices[0].finish_reason == "stop"


def test_stream_is_http11_chunked(server):
    host, port = server[0].address
    body = json.dumps({"prompt": "Comparisons", "max_tokens": 3, "stream": True})
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    assert b"data: [DONE]" in rest and rest.endswith(b"0\r\n\r\n")  # the terminating chunk: a clean end


def test_deltas_hold_back_a_split_character(server):
    tokenizer = server[1].tokenizer
    ids = tokenizer.encode("caf\u00e9 \u2713 \u65e5\u672c done", add_special_tokens=False)
    texts = [tokenizer.decode(ids[:i]) for i in range(1, len(ids) + 1)]
    assert any(t.endswith("\ufffd") for t in texts)  # the tokenizer does split characters
    text_stream = TextStream(stop=[])
    deltas = [text_stream.delta(t) for t in texts[:-1]] + [text_stream.delta(texts[-1], final=True)]
    assert "\ufffd" not in "".join(deltas) and "".join(deltas) == texts[-1]
    incremental = IncrementalDecoder(lambda t: tokenizer.decode(t, skip_special_tokens=True))
    seen = [incremental.update(ids[:i]) for i in range(1, len(ids) + 1)]
    assert all(texts[-1].startswith(t) and "\ufffd" not in t for t in seen) and seen[-1] == texts[-1]
    words = tokenizer.encode(" The with statement   is used\n\twith  caf\u00e9s", add_special_tokens=False)
    incremental = IncrementalDecoder(tokenizer.decode)
    for i in range(1, len(words) + 1, 2):  # two tokens at a time, as an async step may bring
        incremental.update(words[:i])
    assert incremental.update(words) == tokenizer.decode(words)


def test_200_concurrent_streams_each_equal_to_its_solo_text(client, model, server):
    prompts = ["The for statement", "Comparisons", "The import statement", "Boolean operations",
               "The while statement", "The pass statement", "Assignment statements", "What is a generator?"]
    alone = {p: solo(client, model, p, max_tokens=8).text for p in prompts}
    host, port = server[0].address

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them():
        aclient = openai.AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key=KEY, max_retries=0, timeout=300,
                                     http_client=None)
        async with aclient:
            work = [prompts[i % len(prompts)] for i in range(200)]
            return work, await asyncio.gather(*(one(aclient, p) for p in work))
    work, texts = asyncio.run(all_of_them())
    assert texts == [alone[p] for p in work]


# --- clients that leave -------------------------------------------------------------------
def _wait_idle(srv, engine, before, limit):
    for _ in range(600):
        if not srv.loop.active and not engine.has_work():
            break
        time.sleep(0.05)
    assert not srv.loop.active and engine.num_generated_tokens - before < limit


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_client_that_leaves_aborts_its_request(server, client, model, stream):
    srv, llm = server
    engine, (host, port) = llm.launcher.engine, srv.address
    before = engine.num_generated_tokens
    body = json.dumps({"prompt": "The with statement", "max_tokens": 400, "ignore_eos": True, "stream": stream})
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        for _ in range(200):  # until the engine has started on it
            if engine.num_generated_tokens > before:
                break
            time.sleep(0.02)
    _wait_idle(srv, engine, before, 400)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert solo(client, model, "Comparisons", max_tokens=4).finish_reason == "length"


# --- the rest of the HTTP surface ---------------------------------------------------------------
def test_api_key(server, model):
    host, port = server[0].address
    anonymous = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        anonymous.completions.create(model=model, prompt="x", max_tokens=2)
    assert info.value.body["code"] == "invalid_api_key"
    status, _, _ = raw(server[0], "POST", "/tokenize", {"prompt": "x"}, headers={"Authorization": ""})
    assert status == 401
    assert raw(server[0], "GET", "/health", headers={"Authorization": ""})[0] == 200  # a probe needs no key


def test_cors(server):
    srv = server[0]
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    status, headers, _ = raw(srv, "OPTIONS", "/v1/completions", headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = raw(srv, "OPTIONS", "/v1/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert status == 400 and "access-control-allow-origin" not in headers


def test_body_limit(server, client, model):
    status, _, body = raw(server[0], "POST", "/v1/completions", {"prompt": "x" * (BODY_LIMIT + 1)})
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert solo(client, model, "Comparisons", max_tokens=2).finish_reason == "length"


def test_tokenize_and_detokenize(server):
    srv, llm = server
    status, _, body = raw(srv, "POST", "/tokenize", {"prompt": "The for statement"})
    assert status == 200 and body["tokens"] == llm.tokenizer.encode("The for statement") and body["count"] > 0
    status, _, back = raw(srv, "POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == llm.tokenizer.decode(body["tokens"])
    status, _, chat = raw(srv, "POST", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and chat["count"] > body["count"] // 2
    assert raw(srv, "POST", "/detokenize", {"tokens": [10 ** 9]})[2]["error"]["param"] == "tokens"
    assert raw(srv, "POST", "/tokenize", {})[2]["error"]["param"] == "prompt"


def test_metrics(server, client, model):
    solo(client, model, "Comparisons", max_tokens=3)
    status, headers, text = raw(server[0], "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    for name in ("framework_requests_running", "framework_requests_waiting", "framework_kv_cache_usage_ratio",
                 "framework_preemptions_total", "framework_prompt_tokens_total", "framework_generation_tokens_total",
                 "framework_time_to_first_token_seconds_count", "framework_inter_token_latency_seconds_count"):
        assert name in values, name
    assert values["framework_generation_tokens_total"] >= 3 and values["framework_time_to_first_token_seconds_count"] >= 1
    assert values["framework_inter_token_latency_seconds_count"] >= 2
    assert 'framework_memory_bytes{part="weights",source="plan"}' in values
    assert 'framework_memory_bytes{part="weights",source="measured"}' in values


def test_step_histogram_matches_prometheus_buckets():
    """The engine loop's batched histogram renders what prometheus_client's own would."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from framework.serve.metrics import StepHistogram
    values = [0.0005, 0.001, 0.003, 0.02, 0.02, 7.0, 100.0]
    buckets = (0.001, 0.01, 0.05, 10.0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    StepHistogram("lat", "d", buckets, ours).observe_many(values)
    reference = Histogram("lat", "d", buckets=buckets, registry=theirs)
    for v in values:
        reference.observe(v)

    def samples(registry):
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if line.startswith("lat") and "_created" not in line)
    assert samples(ours) == samples(theirs)


def test_a_handler_behind_sends_one_chunk_per_choice():
    """Events queued while a stream's handler was busy merge: each choice's latest (it holds every
    token so far), and a choice's final Event is never replaced."""
    from framework.engine.outputs import CompletionOutput, RequestOutput
    from framework.serve.app import _latest
    from framework.serve.engine_loop import Event

    async def run():
        queue = asyncio.Queue()
        final = Event([5, 6], output=RequestOutput("r", None, [1], [CompletionOutput("", [5, 6], "length")]))
        for item in [(1, Event([7])), (0, Event([5, 6])), (0, final), (1, Event([7, 8]))]:
            queue.put_nowait(item)
        merged = _latest(None, (0, Event([5])), queue)  # no Event needs decoding: no state read
        assert queue.empty()
        return merged
    merged = dict(asyncio.run(run()))
    assert sorted(merged) == [0, 1]
    assert merged[0].output is not None and merged[1].token_ids == [7, 8]


def test_loadgen_over_the_stub_engine(tmp_path):
    """The serving stack alone (loadgen --stub): every streamed request completes with its tokens,
    and the figures name the stub's ideal rate."""
    from framework.serve.loadgen import main, write_word_tokenizer
    write_word_tokenizer(str(tmp_path / "tok"), 1000)
    out = tmp_path / "figures.json"
    assert main(["--stub", "2:0.5", "--stub-tokenizer", str(tmp_path / "tok"), "--concurrency", "8",
                 "--num-requests", "16", "--input-len", "4", "--output-len", "5", "--out", str(out)]) == 0
    level = json.loads(out.read_text())["levels"][0]
    assert level["errors"] == 0 and level["output_tokens"] == 16 * 5
    assert level["stub_ideal_tok_per_s"] == 8 * 1000 / 2 and level["serving_over_ideal"] > 0
