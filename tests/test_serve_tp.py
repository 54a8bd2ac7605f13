"""task=serve at TP=2 (two gloo ranks in Ray actors, the HTTP front in this process): the same
answers as the library at TP=1, streamed or not, and /metrics reads rank 0's engine."""
from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from framework import SamplingParams, compose
from framework.llm import LLM
from framework.serve.server import OpenAIServer

pytestmark = pytest.mark.usefixtures("ray_cluster")
PROMPTS = ["The for statement", "A generator is", "Import a module"]


def test_tp2_serving_equals_tp1_library():
    with LLM(compose(["cache.cpu_kvcache_space_gib=0.1"])) as library:
        expected = [o.text for o in library.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0))]
    cfg = compose(["cache.cpu_kvcache_space_gib=0.1", "parallelism=tp2", "task=serve", "task.port=0"])
    llm = LLM(cfg)
    srv = OpenAIServer(llm, cfg.task)
    try:
        host, port = srv.address
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="none", max_retries=0, timeout=120)
        model = cfg.model.path

        def complete(prompt):
            return client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: they share rank 0's steps
            assert list(pool.map(complete, PROMPTS)) == expected
        stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected[0]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert "kv_cache_blocks" in metrics and "requests_running" in metrics
    finally:
        srv.shutdown()
        llm.shutdown()
