"""task=serve's life: SIGTERM drains (in-flight requests finish, new ones are refused, then
metrics.json), the drain deadline cuts what is left, and an engine loop that dies makes /health
503 and the run exit non-zero."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from framework import compose
from framework.llm import LLM
from framework.serve.engine_loop import EngineLoop
from framework.serve.server import OpenAIServer

REPO = Path(__file__).resolve().parents[1]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_sigterm_drains_then_writes_metrics(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "framework.run", "task=serve", "task.port=0", "task.drain_s=60",
                             "cache.cpu_kvcache_space_gib=0.1", f"hydra.run.dir={tmp_path}/run"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            found = re.search(r"at http://([\d.]+):(\d+)/v1", line)
            if found:
                break
        host, port = found.group(1), int(found.group(2))
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0, timeout=120)
        stream = client.completions.create(model="pydoc-llama", prompt="The with statement", max_tokens=300,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises((ConnectionRefusedError, ConnectionResetError)):  # the listening socket is closed
            socket.create_connection((host, port), timeout=5).recv(1)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"  # the in-flight request finished
        assert len("".join(c.choices[0].text for c in [first] + rest)) > 300
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["serve"]["generation_tokens"] >= 300
    assert metrics["serve"]["requests_finished"] == {"length": 1.0} and metrics["serve"]["failed"] is None


def test_ctrl_c_to_the_process_group_still_writes_the_serving_figures(tmp_path):
    """Ctrl-C reaches the HTTP front's process too (task.frontend_process): the front drains with
    the engine and still hands over its figures, and leaves no process behind."""
    proc = subprocess.Popen([sys.executable, "-m", "framework.run", "task=serve", "task.port=0",
                             "cache.cpu_kvcache_space_gib=0.1", f"hydra.run.dir={tmp_path}/run"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            found = re.search(r"at http://([\d.]+):(\d+)/v1", line)
            if found:
                break
        client = openai.OpenAI(base_url=f"http://{found.group(1)}:{found.group(2)}/v1", api_key="x",
                               max_retries=0, timeout=120)
        client.completions.create(model="pydoc-llama", prompt="The", max_tokens=5, extra_body={"ignore_eos": True})
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["serve"]["generation_tokens"] == 5 and metrics["serve"]["requests_finished"] == {"length": 1.0}
    left = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    assert "spawn_main" not in left, left  # no HTTP front left running (a resource tracker may linger a moment)


@pytest.fixture
def served():
    cfg = compose(["cache.cpu_kvcache_space_gib=0.1", "task=serve", "task.port=0", "task.drain_s=0.5"])
    with LLM(cfg) as llm:
        yield llm, cfg


def test_the_drain_deadline_cuts_what_is_left(served):
    llm, cfg = served
    srv = OpenAIServer(llm, cfg.task)
    host, port = srv.address
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0, timeout=60)
    chunks = iter(client.completions.create(model="pydoc-llama", prompt="The with statement", max_tokens=480,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    next(chunks)
    started = time.monotonic()
    srv.drain()
    with pytest.raises(Exception):  # the stream is cut: no finish_reason, no [DONE]
        for chunk in chunks:
            assert chunk.choices[0].finish_reason is None
    assert srv.wait(timeout=30) and time.monotonic() - started < 10
    engine = llm.launcher.engine
    for _ in range(100):
        if not engine.has_work():
            break
        time.sleep(0.05)
    assert not engine.has_work()  # the cut request was aborted in the engine
    srv.shutdown()


def test_a_front_process_that_dies_stops_the_server_as_failed(served):
    """The HTTP front's process killed: the server stops and says why (task=serve then exits
    non-zero, so a supervisor restarts it); the engine loop is left to be shut down."""
    llm, cfg = served
    srv = OpenAIServer(llm, cfg.task)
    srv.front.process.kill()
    assert srv.wait(timeout=30)
    assert srv.failed is not None and "HTTP front" in str(srv.failed)
    srv.shutdown()
    assert srv.summary()["serve"]["failed"] is not None  # what metrics.json would say


def test_an_engine_loop_that_dies_is_503_then_stops(served, monkeypatch):
    llm, cfg = served

    def broken(self, finished):
        raise RuntimeError("bug in the loop")
    monkeypatch.setattr(EngineLoop, "_after_step", broken)
    srv = OpenAIServer(llm, cfg.task)
    host, port = srv.address
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError, match="engine loop died"):
        client.completions.create(model="pydoc-llama", prompt="x", max_tokens=4)
    assert _status(f"http://{host}:{port}/health") == 503
    assert srv.wait(timeout=10) and srv.failed is not None
    srv.shutdown()


def test_task_serve_exits_non_zero_when_the_engine_loop_dies(tmp_path, monkeypatch):
    from framework.tasks import serve

    def broken(self, block):
        raise RuntimeError("bug in the loop")
    monkeypatch.setattr(EngineLoop, "_drain_inbox", broken)
    cfg = compose(["cache.cpu_kvcache_space_gib=0.1", "task=serve", "task.port=0"])
    assert serve.run(cfg, tmp_path) == serve.ENGINE_DIED
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "bug in the loop" in metrics["serve"]["failed"]


@pytest.mark.parametrize("override,key", [("task.drain_s=-1", "task.drain_s"), ("task.api_key=''", "task.api_key"),
                                          ("task.max_body_bytes=0", "task.max_body_bytes")])
def test_serve_knobs_are_checked_before_loading(override, key):
    from framework.config.errors import ConfigError
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(["task=serve", override])
