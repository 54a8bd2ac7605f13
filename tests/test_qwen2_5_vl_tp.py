"""Qwen2.5-VL at TP=2 on CPU (gloo ranks in Ray actors): the decoder is split, the vision tower
replicated on both ranks; the tokens equal TP=1's."""
from __future__ import annotations

import pytest

from tests.test_qwen2_5_vl import REQUESTS, ours, vl_config
from tests.vl_helpers import build_tiny_qwen2_5_vl

pytest.importorskip("torchvision", reason="HF's Qwen2-VL processors need torchvision (a project dependency)")
pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def test_tp2_equals_tp1(tmp_path):
    folder = build_tiny_qwen2_5_vl(tmp_path / "vl")
    requests = [REQUESTS["two_images_of_different_sizes"], REQUESTS["video"], REQUESTS["text_only"]]
    single, single_stats = ours(vl_config(folder, max_num_batched_tokens=32), requests)
    cfg = vl_config(folder, max_num_batched_tokens=32)
    cfg.parallelism.tensor_parallel_size = 2
    from framework.llm import LLM
    from framework import SamplingParams
    with LLM(cfg) as llm:
        outs = llm.generate(requests, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        ranks = llm.stats()["ranks"]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in single]
    # the tower is replicated: each rank holds all of it
    assert [r["vision_weight_bytes"] for r in ranks] == [single_stats["vision_weight_bytes"]] * 2


def test_tp2_server_takes_image_parts(tmp_path):
    """task=serve at TP=2: the chat request's image goes through the driver's HTTP front to rank
    0's engine in its actor; the answer equals the TP=1 library's."""
    import base64
    import json
    import urllib.request
    from framework import SamplingParams
    from framework.llm import LLM
    from framework.serve.server import OpenAIServer
    from tests.vl_helpers import random_image
    folder = build_tiny_qwen2_5_vl(tmp_path / "vl")
    path = tmp_path / "a.png"
    random_image(90, 130, seed=1).save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe."}]}]
    with LLM(vl_config(folder)) as single:
        want = single.chat(messages, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].text
    cfg = vl_config(folder)
    cfg.parallelism.tensor_parallel_size, cfg.task.port = 2, 0
    llm = LLM(cfg)
    srv = OpenAIServer(llm, cfg.task)
    try:
        host, port = srv.address
        body = {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        request = urllib.request.Request(f"http://{host}:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            assert json.loads(response.read())["choices"][0]["message"]["content"] == want
    finally:
        srv.shutdown()
        llm.shutdown()
