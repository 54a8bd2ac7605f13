"""task=serve: OpenAI-shaped requests over HTTP, concurrent ones batched, bad ones refused alone."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from framework import SamplingParams, compose
from framework.llm import LLM
from framework.serve.server import OpenAIServer


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


@pytest.mark.parametrize("body,param", [({"prompt": "x", "stream": True}, "stream"),
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
