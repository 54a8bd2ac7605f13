"""Qwen2.5-VL end to end on CPU: our engine against HF transformers, token for token (greedy)."""
from __future__ import annotations

import pytest
import torch

from framework import SamplingParams
from framework.llm import LLM
from tests.helpers import small_config
from tests.vl_helpers import build_tiny_qwen2_5_vl, random_image, random_video

pytest.importorskip("torchvision", reason="HF's Qwen2-VL processors need torchvision (a project dependency)")

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
MAX_TOKENS = 8


def chat_text(parts: str, question: str = "Describe.") -> str:
    return f"<|im_start|>user\n{parts}{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


def vl_config(folder, limits=None, **cache):
    cfg = small_config(folder, **cache)
    cfg.multimodal.limit_mm_per_prompt = limits if limits is not None else {"image": 2, "video": 1}
    cfg.multimodal.mm_input_cache_gib = 0.01
    return cfg


def hf_greedy(folder, requests, max_tokens=MAX_TOKENS):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    outs = []
    for req in requests:
        data = req.get("multi_modal_data", {})
        images = data.get("image")
        images = None if images is None else images if isinstance(images, list) else [images]
        videos = [data["video"]] if "video" in data else None
        inputs = processor(text=[req["prompt"]], images=images, videos=videos, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return outs


def ours(cfg, requests, max_tokens=MAX_TOKENS):
    with LLM(cfg) as llm:
        outs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return outs, llm.stats()["ranks"][0]


REQUESTS = {
    "one_image": {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": random_image(90, 130, seed=1)}},
    "two_images_of_different_sizes": {"prompt": chat_text(IMAGE + "and" + IMAGE, "Compare."),
                                      "multi_modal_data": {"image": [random_image(200, 60, seed=2),
                                                                     random_image(84, 84, seed=3)]}},
    "video": {"prompt": chat_text(VIDEO), "multi_modal_data": {"video": random_video(4, 56, 84, seed=4)}},
    "text_only": {"prompt": chat_text("", "Hello there, how are you?")},
}


def test_hf_equality_all_cases_in_one_batch(folder):
    requests = list(REQUESTS.values())
    outs, stats = ours(vl_config(folder), requests)
    assert [o.error for o in outs] == [None] * len(requests)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(folder, requests)
    assert stats["encoder_cache"]["misses"] == 4 and stats["vision_weight_bytes"] > 0


def test_prefill_chunks_split_images_and_preemption_keeps_outputs(folder):
    """16-token steps cut every image's placeholder run across several chunks; a KV cache of a
    few blocks preempts and recomputes requests (their items are encoded again or hit the cache)."""
    requests = [REQUESTS["two_images_of_different_sizes"], REQUESTS["video"],
                {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": random_image(250, 300, seed=9)}}]
    want = hf_greedy(folder, requests)
    outs, stats = ours(vl_config(folder, max_num_batched_tokens=16), requests)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["encoder_cache"]["budget_tokens"] >= 64  # raised to the largest item
    outs, stats = ours(vl_config(folder, max_num_batched_tokens=16, num_gpu_blocks_override=20,
                                 max_model_len=150), requests)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["num_preemptions"] > 0


def test_same_placeholders_different_images_never_share_kv(folder):
    """Prefix caching on: the prompts' token ids are identical, their images differ."""
    requests = [{"prompt": chat_text(IMAGE), "multi_modal_data": {"image": random_image(112, 112, seed=s)}}
                for s in (11, 12, 11)]
    outs, stats = ours(vl_config(folder, enable_prefix_caching=True), requests)
    got = [o.outputs[0].token_ids for o in outs]
    assert outs[0].prompt_token_ids == outs[1].prompt_token_ids
    assert got == hf_greedy(folder, requests) and got[0] != got[1]
    assert stats["mm_processor_cache"]["hits"] == 1  # the repeated image skipped the processor


def test_bad_requests_fail_alone(folder, tmp_path):
    good = REQUESTS["one_image"]
    bad = [
        {"prompt": chat_text(IMAGE * 3), "multi_modal_data": {"image": [random_image(56, 56, seed=i) for i in range(3)]}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": b"not a png"}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": 42}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"audio": [b"x"]}},
        {"prompt": chat_text(IMAGE + IMAGE), "multi_modal_data": {"image": random_image(56, 56)}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": random_image(56, 56)},
         "mm_processor_kwargs": {"max_pixel": 1}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": random_image(900, 900)},
         "mm_processor_kwargs": {"max_pixels": 28 * 28 * 400}},  # 400 tokens > max_model_len
    ]
    outs, _ = ours(vl_config(folder, max_model_len=200), [good] + bad + [good])
    assert outs[0].error is None and outs[-1].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids == hf_greedy(folder, [good])[0]
    errors = [o.error for o in outs[1:-1]]
    for error, expected in zip(errors, ["limit_mm_per_prompt.image=2", "could not be decoded as an image",
                                        "is a int, not an image", "takes no audio input",
                                        "2 <|image_pad|> placeholder(s) for 1 image", "mm_processor_kwargs.max_pixel=1",
                                        "cache.max_model_len=200"]):
        assert error is not None and expected in error and "\n" not in error, (error, expected)


def test_max_pixels_lowers_the_prompt_tokens(folder):
    image = random_image(300, 300, seed=5)
    request = {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": image}}
    full, _ = ours(vl_config(folder), [request], max_tokens=1)
    cfg = vl_config(folder)
    cfg.multimodal.mm_processor_kwargs = {"max_pixels": 28 * 28 * 16}
    capped, _ = ours(cfg, [request], max_tokens=1)
    from transformers import AutoProcessor
    image_processor = AutoProcessor.from_pretrained(folder).image_processor
    tokens = [image_processor.get_number_of_image_patches(300, 300, kw) // 4 for kw in ({}, {"max_pixels": 28 * 28 * 16})]
    assert tokens[0] > tokens[1]
    assert len(full[0].prompt_token_ids) - len(capped[0].prompt_token_ids) == tokens[0] - tokens[1]


def test_language_model_only_holds_no_vision_weights(folder):
    from framework.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    text = REQUESTS["text_only"]
    full, full_stats = ours(vl_config(folder), [text])
    for limits, flag in (({"image": 0, "video": 0}, False), ({"image": 2}, True)):
        cfg = vl_config(folder, limits=limits)
        cfg.multimodal.language_model_only = flag
        with LLM(cfg) as llm:
            model = llm.launcher.local_engine().runner.model
            assert isinstance(model, Qwen2_5_VLForConditionalGeneration) and model.visual is None
            assert not any(name.startswith("visual") for name, _ in model.named_parameters())
            outs = llm.generate([text, REQUESTS["one_image"]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                           ignore_eos=True))
            stats = llm.stats()["ranks"][0]
        assert outs[0].outputs[0].token_ids == full[0].outputs[0].token_ids == hf_greedy(folder, [text])[0]
        assert outs[1].error is not None and "no images or videos" in outs[1].error
        assert stats["vision_weight_bytes"] == 0
        assert full_stats["weight_bytes"] - stats["weight_bytes"] == full_stats["vision_weight_bytes"]
        assert stats["bytes_read"] < full_stats["bytes_read"]  # the tower's tensors are never read


def test_chat_with_content_parts_equals_generate(folder, tmp_path):
    import base64
    image = random_image(90, 130, seed=1)
    path = tmp_path / "a.png"
    image.save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    conversations = [
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{path}"}},
                                      {"type": "text", "text": "Describe."}]}],
        [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "a.mp4"}}]}],
    ]
    with LLM(vl_config(folder)) as llm:
        outs = llm.chat(conversations, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    want = hf_greedy(folder, [REQUESTS["one_image"]])[0]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == want
    assert outs[2].error is not None and "video file decoder" in outs[2].error


def test_server_chat_completions_take_image_parts(folder, tmp_path):
    import base64
    import json
    import urllib.error
    import urllib.request
    from framework.serve.server import OpenAIServer
    image = random_image(90, 130, seed=1)
    path = tmp_path / "a.png"
    image.save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    cfg = vl_config(folder)
    cfg.task.port = 0
    llm = LLM(cfg)
    want = llm.generate([REQUESTS["one_image"]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                ignore_eos=True))[0].text
    srv = OpenAIServer(llm, cfg.task)  # its loop drives the engine from here on
    import threading
    processor, threads = llm.launcher.local_engine().mm_processor, []
    original = processor.process
    processor.process = lambda *a, **k: threads.append(threading.current_thread().name) or original(*a, **k)

    def post(body):
        host, port = srv.address
        request = urllib.request.Request(f"http://{host}:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
    try:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "Describe."}]}],
                "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        status, out = post(body)
        assert status == 200 and out["choices"][0]["message"]["content"] == want
        bad = dict(body, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}])
        status, out = post(bad)
        assert status == 400 and "network URL" in out["error"]["message"]
        assert out["error"]["param"] == "messages[0].content[0]"
        three = dict(body, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 3}])
        status, out = post(three)
        assert status == 400 and "limit_mm_per_prompt.image=2" in out["error"]["message"]
        # text that fits max_model_len (512) alone, but not with the image's 64 tokens: the engine
        # refuses it at admission, which is the client's 400, not a server error
        big = tmp_path / "big.png"
        random_image(600, 600, seed=2).save(big)
        big_url = "data:image/png;base64," + base64.b64encode(big.read_bytes()).decode()
        status, out = post(dict(body, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": big_url}}, {"type": "text", "text": "x" * 460}]}]))
        assert status == 400 and out["error"]["param"] == "messages", out
        status, out = post(body)  # the server goes on
        assert status == 200 and out["choices"][0]["message"]["content"] == want
        # images are processed off the engine's process (task.frontend_process): the engine's own
        # processor never runs for a served request, the front's copy does
        assert threads == []
    finally:
        srv.shutdown()
        llm.shutdown()
    cache = srv.summary()["serve"]["mm_processor_cache"]  # the front's: the same image twice is one hit
    assert cache["hits"] >= 1 and cache["misses"] >= 1


def test_tasks_take_image_paths(folder, tmp_path):
    """task=chat with task.images; task=generate with a JSONL prompts_file carrying "images"."""
    import json
    from framework.tasks import generate
    path = tmp_path / "a.png"
    random_image(90, 130, seed=1).save(path)
    want = hf_greedy(folder, [REQUESTS["one_image"]])[0]
    cfg = vl_config(folder)
    cfg.task.prompts, cfg.task.images = ["Describe."], [str(path)]
    cfg.task.max_tokens, cfg.task.ignore_eos, cfg.task.progress = MAX_TOKENS, True, False
    assert generate.run(cfg, tmp_path / "chat", chat=True) == 0
    rows = [json.loads(line) for line in (tmp_path / "chat" / "outputs.jsonl").read_text().splitlines()]
    assert rows[0]["token_ids"] == want
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": REQUESTS["one_image"]["prompt"], "images": [f"file://{path}"]}) + "\n"
                       + json.dumps({"prompt": "no image here"}) + "\n")
    cfg.task.prompts, cfg.task.images, cfg.task.prompts_file = [], [], str(prompts)
    assert generate.run(cfg, tmp_path / "gen") == 0
    rows = [json.loads(line) for line in (tmp_path / "gen" / "outputs.jsonl").read_text().splitlines()]
    assert rows[0]["token_ids"] == want and rows[1]["error"] is None


def test_async_scheduling_keeps_outputs(folder):
    """The next step is built before this one's tokens reach the host: image steps still merge
    their embeddings and M-RoPE rows correctly."""
    requests = [REQUESTS["one_image"], REQUESTS["video"]]
    outs, _ = ours(vl_config(folder, async_scheduling=True, max_num_batched_tokens=32), requests)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(folder, requests)


def test_memory_profile_runs_the_encoder_on_its_whole_budget(folder):
    """Before the KV cache is sized (on a GPU), the profile encodes one item of the encoder
    budget and holds its outputs; text-only runs skip it."""
    with LLM(vl_config(folder, max_num_batched_tokens=32)) as llm:
        runner = llm.launcher.local_engine().runner
        seen = []
        real = runner.model.embed_multimodal
        runner.model.embed_multimodal = lambda items: seen.append(items) or real(items)
        runner.profile_run()
        assert runner.encoder_budget_tokens == llm.launcher.local_engine().encoder_cache.budget_tokens >= 64
        (modality, data), = seen[0]
        assert modality == "image" and int(data["image_grid_thw"].prod()) // 4 >= runner.encoder_budget_tokens
    with LLM(vl_config(folder, limits={"image": 0, "video": 0})) as llm:
        assert llm.launcher.local_engine().runner.encoder_budget_tokens == 0


def test_a_failing_encoder_fails_its_requests_only(folder):
    """The tower raising in one step fails that step's requests; the engine, its encoder cache
    and later requests go on."""
    with LLM(vl_config(folder)) as llm:
        model = llm.launcher.local_engine().runner.model
        real = model.embed_multimodal
        model.embed_multimodal = lambda items: (_ for _ in ()).throw(RuntimeError("tower broke"))
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        failed = llm.generate([REQUESTS["one_image"]], params)[0]
        assert failed.error is not None and "tower broke" in failed.error
        model.embed_multimodal = real
        again = llm.generate([REQUESTS["one_image"], REQUESTS["text_only"]], params)
        assert [o.error for o in again] == [None, None]
        assert [o.outputs[0].token_ids for o in again] == hf_greedy(folder, [REQUESTS["one_image"], REQUESTS["text_only"]])
        image_tokens = again[0].prompt_token_ids.count(llm.hf_config.image_token_id)
        assert llm.launcher.local_engine().encoder_cache.stats.used_tokens == image_tokens > 0  # nothing leaked
