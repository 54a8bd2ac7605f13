"""task=serve: OpenAI-shaped requests over HTTP, concurrent ones batched, bad ones refused alone."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from framework import SamplingParams, compose
from framework.llm import LLM
from framework.serve.server import OpenAIServer
from framework.serve.text_stream import TextStream


@pytest.fixture(scope="module")
def server():
    # async scheduling (the GPU default) here, so the library comparisons below, which run sync on
    # the CPU, check one against the other under concurrent requests
    llm = LLM(compose(["cache.cpu_kvcache_space_gib=0.1", "cache.async_scheduling=true", "task=serve", "task.port=0"]))
    srv = OpenAIServer(llm, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, llm
    srv.shutdown()
    llm.shutdown()


def call(srv, path, body=None):
    host, port = srv.address
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_completions_match_the_library(server):
    srv, _ = server
    status, body = call(srv, "/v1/completions", {"prompt": "The for statement", "max_tokens": 12, "temperature": 0})
    assert status == 200, body
    with LLM(compose(["cache.cpu_kvcache_space_gib=0.1"])) as library:  # the server's engine is busy serving
        expected = library.generate("The for statement", SamplingParams(max_tokens=12, temperature=0))[0]
    choice = body["choices"][0]
    assert choice["text"] == expected.text and choice["finish_reason"] == expected.finish_reason
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)


def test_concurrent_requests_with_a_bad_one(server):
    srv, _ = server
    prompts = ["Boolean operations", "The import statement", "Comparisons", "The while statement"]
    bodies = [{"prompt": p, "max_tokens": 10, "temperature": 0} for p in prompts]
    bodies.insert(2, {"prompt": "The pass statement", "max_tokens": -3})
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: call(srv, "/v1/completions", b), bodies))
    bad_status, bad_body = results.pop(2)
    assert bad_status == 400 and "max_tokens=-3" in bad_body["error"]["message"]
    alone = [call(srv, "/v1/completions", b)[1]["choices"][0]["text"] for b in bodies[:2] + bodies[3:]]
    assert [status for status, _ in results] == [200] * 4
    assert [body["choices"][0]["text"] for _, body in results] == alone


def test_chat_completions(server):
    srv, _ = server
    status, body = call(srv, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "What is a generator?"}], "max_tokens": 8})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("body,param", [({"prompt": "x", "stream": "yes"}, "stream"),
                                        ({"prompt": 5}, "prompt"),
                                        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
                                        ({"prompt": "x", "n": 2}, "n")])
def test_bad_fields_are_400_naming_the_field(server, body, param):
    status, reply = call(server[0], "/v1/completions", body)
    assert status == 400 and reply["error"]["param"] == param


def test_models_health_and_unknown_routes(server):
    srv, llm = server
    assert call(srv, "/health") == (200, {"status": "ok"})
    status, body = call(srv, "/v1/models")
    assert status == 200 and body["data"][0]["id"] == llm.config.model.path
    assert call(srv, "/v1/nothing", {})[0] == 404


def stream(srv, path, body):
    """(content type, [each event's payload]) of a streamed request; every line checked as SSE."""
    host, port = srv.address
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        content_type, raw = response.headers["Content-Type"], response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "", raw  # every event ends with a blank line
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1]), raw
    payloads = [e[len("data: "):] for e in events[:-1]]
    assert payloads[-1] == "[DONE]", raw
    return content_type, [json.loads(p) for p in payloads[:-1]]


def test_streamed_completion_adds_up_to_the_plain_one(server):
    srv, _ = server
    body = {"prompt": "The for statement", "max_tokens": 12, "temperature": 0}
    plain = call(srv, "/v1/completions", body)[1]["choices"][0]
    content_type, chunks = stream(srv, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert content_type == "text/event-stream"
    assert all(c["object"] == "text_completion" for c in chunks)
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == plain["text"] and len([t for t in texts if t]) > 1  # piece by piece
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert len({c["id"] for c in chunks}) == 1


def test_streamed_chat(server):
    srv, _ = server
    body = {"messages": [{"role": "user", "content": "What is a generator?"}], "max_tokens": 10, "temperature": 0}
    plain = call(srv, "/v1/chat/completions", body)[1]["choices"][0]
    _, chunks = stream(srv, "/v1/chat/completions", body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
    assert text == plain["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


def test_streamed_stop_string_does_not_leak(server):
    srv, _ = server
    body = {"prompt": "The while statement", "max_tokens": 24, "temperature": 0}
    text = call(srv, "/v1/completions", body)[1]["choices"][0]["text"]
    stop = text[6:14]  # eight characters span several tokens: their first ones come before the stop is complete
    body["stop"] = ["never there", stop]
    plain = call(srv, "/v1/completions", body)[1]["choices"][0]
    assert plain["finish_reason"] == "stop" and plain["text"] == text[:text.find(stop)]
    _, chunks = stream(srv, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/completions", {"prompt": "The pass statement", "max_tokens": -3}, "max_tokens=-3"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "one prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens=0")])
def test_bad_streamed_request_is_a_400_not_a_stream(server, path, body, needle):
    status, reply = call(server[0], path, {**body, "stream": True})
    assert status == 400 and needle in reply["error"]["message"]


def test_deltas_hold_back_a_split_character(server):
    tokenizer = server[1].tokenizer
    ids = tokenizer.encode("caf\u00e9 \u2713 \u65e5\u672c done", add_special_tokens=False)
    texts = [tokenizer.decode(ids[:i]) for i in range(1, len(ids) + 1)]
    assert any(t.endswith("\ufffd") for t in texts)  # the tokenizer does split characters
    text_stream = TextStream(stop=[])
    deltas = [text_stream.delta(t) for t in texts[:-1]] + [text_stream.delta(texts[-1], final=True)]
    assert "\ufffd" not in "".join(deltas) and "".join(deltas) == texts[-1]


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(server):
    srv, llm = server
    engine, host, port = llm.launcher.engine, *srv.address
    before = engine.num_generated_tokens
    body = json.dumps({"prompt": "The with statement", "max_tokens": 200, "ignore_eos": True, "stream": True})
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.0 200")
    for _ in range(600):  # the next write fails, and the loop aborts the request after its step
        if not srv.loop.streams and not engine.has_work():
            break
        time.sleep(0.05)
    assert not srv.loop.streams and engine.num_generated_tokens - before < 200
    status, reply = call(srv, "/v1/completions", {"prompt": "Comparisons", "max_tokens": 4})
    assert status == 200 and reply["usage"]["completion_tokens"] == 4
