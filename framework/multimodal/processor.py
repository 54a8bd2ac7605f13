"""A prompt with images and videos -> token ids with each item's placeholder run, and each item's
processed tensors, using the model folder's own HF processor (`AutoProcessor`).

The prompt carries one placeholder token per item, as the model's chat template writes it
(Qwen2.5-VL: `<|vision_start|><|image_pad|><|vision_end|>`). Each item is processed alone
(`processor(text=[placeholder], images=[item])`), which gives its tensors and the tokens the
placeholder becomes: one run of placeholder tokens (where the item's embeddings go), with any
text tokens the processor writes around it (InternVL: `<img>` before, `</img>` after); the
prompt's placeholder is replaced by the same. That is exactly what the HF processor does to the
whole prompt (the placeholder is a special token, so text around it tokenizes the same), and
processing items alone lets the cache hold each one.

Some processors place the image themselves and write it as more than the placeholder repeated
(Fuyu: `|SPEAKER|` rows each closed by `|NEWLINE|`, then `<s>`, always before the text). Those
are called with empty text; the item's run is what they wrote for the image, and its token ids
travel in the item's data as `run_token_ids` (the model embeds the non-placeholder ones as text).
A prompt with no placeholder gets one per image before its text, where those processors put them.

Gemma-3's processor also writes plain text around an image (`\n\n`), which its tokenizer may merge
with the prompt's text beside it when the whole prompt is tokenized: each stretch of ordinary
tokens that holds such written text is decoded and tokenized again as one (`_joined`).

Gemma-3's processor takes `<start_of_image>` in the prompt but fills the image with another token
(`<image_soft_token>`): the run is of that token. With pan-and-scan it writes the image and each
crop as runs of their own with text between; the item's run then spans them all, and carries its
token ids (`run_token_ids`) like Fuyu's. Each item records its maximal runs of the filled token
(`embedding_runs`): a model whose image tokens attend both ways (Gemma-3) keeps each whole in one
prefill chunk.

`multimodal.mm_processor_kwargs` and a request's own `mm_processor_kwargs` (which win) go to
every call; a key neither the image nor the video processor takes is refused, naming the
valid ones, instead of transformers' warning-and-ignore.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from framework.config.errors import ConfigError
from framework.multimodal.cache import ProcessorCache, tensor_bytes
from framework.multimodal.limits import (MODALITIES, MultimodalInputError, ModalityLimit, check_counts,
                                         parse_limits, text_only)
from framework.multimodal.media import content_hash, load_image, load_video

# processor outputs that describe the text, not the item
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# keys of the processors' typed kwargs that are ours to set, not the user's
_INTERNAL_KWARGS = {"return_tensors", "device", "data_format", "input_data_format", "video_metadata",
                    "return_metadata"}
# (image_processor attribute, modality, processor attribute naming its placeholder token)
_SUBPROCESSORS = (("image_processor", "image", "image_token"), ("video_processor", "video", "video_token"))
# vLLM's names for a processor's own kwargs: (ours, the processor's); used where the processor takes
# the target (InternVL's GotOcr2 image processor: max_patches tiles, plus a thumbnail)
_ALIASES = (("max_dynamic_patch", "max_patches"), ("min_dynamic_patch", "min_patches"))
_TILE_KEYS = {name for pair in _ALIASES for name in pair}
# processors that put the image before the text themselves (see the module docstring)
_PLACES_ITEMS_ITSELF = {"FuyuProcessor"}
# processors that fill an image with another token than the prompt's placeholder: the token's
# tokenizer attribute (Gemma-3: <start_of_image> in the prompt, <image_soft_token> in the run)
_RUN_TOKEN_ATTR = {"Gemma3Processor": "image_token_id"}
# processors that may write one item as several runs with text between (Gemma-3's pan-and-scan crops)
_SPLIT_RUNS = {"Gemma3Processor"}


@dataclass
class ProcessedItem:
    """One image or video after the HF processor: what the encoder needs, shared through the cache."""
    modality: str
    content_hash: str  # pixels + processor kwargs: the cache key, and what prefix-cache block hashes mix in
    num_tokens: int  # tokens of its run in the prompt
    data: Dict[str, torch.Tensor]  # this item's processor outputs (Qwen2.5-VL: pixel_values, image_grid_thw...)
    # text tokens the processor writes around the placeholder run (InternVL: <img> ... </img>)
    prefix_ids: List[int] = field(default_factory=list)
    suffix_ids: List[int] = field(default_factory=list)
    # [start, end) inside the run of each maximal stretch of embedding tokens (one per image or
    # crop); empty: the whole run is one
    embedding_runs: List[Tuple[int, int]] = field(default_factory=list)

    def runs(self) -> List[Tuple[int, int]]:
        return self.embedding_runs or [(0, self.num_tokens)]

    def run_token_ids(self, placeholder: int) -> List[int]:
        """The tokens the item fills the prompt with: its own (Fuyu), or the placeholder repeated."""
        run = self.data.get("run_token_ids")
        return run.tolist() if run is not None else [placeholder] * self.num_tokens

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.data)


@dataclass
class PlacedItem:
    offset: int  # index of the item's first placeholder token in the expanded prompt
    item: ProcessedItem

    @property
    def end(self) -> int:
        return self.offset + self.item.num_tokens


@dataclass
class MultimodalPrompt:
    token_ids: List[int]
    items: List[PlacedItem] = field(default_factory=list)  # in prompt order


def valid_processor_kwargs(processor: Any) -> List[str]:
    keys = set()
    for attr, _, _ in _SUBPROCESSORS:
        sub = getattr(processor, attr, None)
        typed = getattr(sub, "valid_kwargs", None)
        if typed is not None:
            keys |= set(getattr(typed, "__optional_keys__", ())) | set(getattr(typed, "__required_keys__", ()))
    keys -= _INTERNAL_KWARGS
    return sorted(keys | {alias for alias, target in _ALIASES if target in keys})


class MultimodalProcessor:
    def __init__(self, processor: Any, mm_processor_kwargs: Optional[Mapping[str, Any]] = None,
                 limit_mm_per_prompt: Optional[Mapping[str, Any]] = None, language_model_only: bool = False,
                 cache: Optional[ProcessorCache] = None, modalities: Optional[Sequence[str]] = None):
        """modalities: those the model takes (None: every one the processor has a token for)."""
        self.hf = processor
        self.tokenizer = processor.tokenizer
        self.added_tokens = set(self.tokenizer.added_tokens_decoder)  # the tokenizer splits text at these
        self.valid_kwargs = valid_processor_kwargs(processor)
        # placeholder token id of each modality this processor (and so the model) takes, and the
        # token its run is filled with (the same but for Gemma-3's images)
        self.placeholders: Dict[str, int] = {}
        self.run_tokens: Dict[str, int] = {}
        for attr, modality, token_attr in _SUBPROCESSORS:
            token = getattr(processor, token_attr, None)
            if getattr(processor, attr, None) is not None and token is not None and (
                    modalities is None or modality in modalities):
                self.placeholders[modality] = self.tokenizer.convert_tokens_to_ids(token)
                own = _RUN_TOKEN_ATTR.get(type(processor).__name__) if modality == "image" else None
                self.run_tokens[modality] = getattr(self.tokenizer, own) if own else self.placeholders[modality]
        self.language_model_only = language_model_only
        self.limits: Dict[str, ModalityLimit] = parse_limits(limit_mm_per_prompt or {}, language_model_only,
                                                            modalities=list(self.placeholders))
        self.kwargs = dict(mm_processor_kwargs or {})
        self._check_kwargs(self.kwargs, "multimodal.mm_processor_kwargs", config=True)
        self.cache = cache if cache is not None else ProcessorCache(0)
        if self.kwargs and not self.text_only:  # a bad value fails at start-up, not on the first request
            probe = Image.new("RGB", (56, 56))
            modality = "image" if "image" in self.placeholders else "video"
            try:
                self.process_item(modality, probe if modality == "image" else [probe, probe], self.kwargs,
                                  f"a 56x56 test {modality}", use_cache=False)
            except MultimodalInputError as exc:
                raise ConfigError("multimodal.mm_processor_kwargs", self.kwargs, f"the processor refuses them: {exc}")

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "MultimodalProcessor":
        from transformers import AutoProcessor
        return cls(AutoProcessor.from_pretrained(path), **kwargs)

    @property
    def places_items_itself(self) -> bool:
        return type(self.hf).__name__ in _PLACES_ITEMS_ITSELF

    @property
    def text_only(self) -> bool:
        return text_only(self.limits)

    # --- kwargs -----------------------------------------------------------------------
    def _check_kwargs(self, kwargs: Mapping[str, Any], where: str, config: bool = False) -> None:
        for key, value in kwargs.items():
            expected = None
            if key not in self.valid_kwargs:
                expected = f"unknown key for {type(self.hf).__name__}; valid keys: {', '.join(self.valid_kwargs)}"
            elif key in _TILE_KEYS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                expected = "must be an integer >= 1 (tiles an image is cut into)"  # HF takes 0 and cuts one
            if expected is None:
                continue
            if config:
                raise ConfigError(f"{where}.{key}", value, expected)
            raise MultimodalInputError(f"{where}.{key}={value!r}: {expected}")

    def _kwargs_for(self, request_kwargs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        if request_kwargs:
            if not isinstance(request_kwargs, Mapping):
                raise MultimodalInputError(f"mm_processor_kwargs must be a dict, got {type(request_kwargs).__name__}")
            self._check_kwargs(request_kwargs, "mm_processor_kwargs")
        return {**self.kwargs, **(request_kwargs or {})}

    # --- one item ---------------------------------------------------------------------
    def process_item(self, modality: str, raw: Any, kwargs: Mapping[str, Any], where: str,
                     use_cache: bool = True) -> ProcessedItem:
        frames = [load_image(raw, where)] if modality == "image" else load_video(raw, where)
        key = content_hash(modality, frames, json.dumps(kwargs, sort_keys=True, default=repr))
        cached = self.cache.get(key) if use_cache else None
        if cached is not None:
            return cached
        token = self.run_tokens[modality]
        media = {"images": frames} if modality == "image" else {"videos": [frames]}
        text = "" if self.places_items_itself else self.tokenizer.convert_ids_to_tokens(self.placeholders[modality])
        try:
            # the item alone, without the BOS a tokenizer may add to a text
            own = {} if self.places_items_itself else {"add_special_tokens": False}
            out = self.hf(text=[text], return_tensors="pt", **own, **media, **self._call_kwargs(modality, kwargs))
        except Exception as exc:  # a bad kwarg value, a frame count the processor cannot use...
            raise MultimodalInputError(f"{where} could not be processed: {type(exc).__name__}: {exc}") from None
        data = {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        ids = out["input_ids"][0].tolist()
        if self.places_items_itself:
            run = self._own_run(ids, token)
            data["run_token_ids"] = torch.tensor(run)
            item = ProcessedItem(modality, key, len(run), data)
        else:
            runs = [i for i, t in enumerate(ids) if t == token]
            first, last = (runs[0], runs[-1] + 1) if runs else (0, 0)
            split = last - first != len(runs)
            if not runs or (split and type(self.hf).__name__ not in _SPLIT_RUNS):  # one contiguous run of embeddings
                raise MultimodalInputError(f"{where}: the processor did not write one run of placeholder tokens for it")
            if split:  # pan-and-scan crops: the run holds the text between them
                data["run_token_ids"] = torch.tensor(ids[first:last])
            item = ProcessedItem(modality, key, last - first, data, ids[:first], ids[last:],
                                 embedding_runs=_stretches(ids[first:last], token) if split else [])
        if use_cache:
            self.cache.put(key, item)
        return item

    def _own_run(self, ids: List[int], token: int) -> List[int]:
        """The image part of a self-placing processor's output for empty text: up to its last
        placeholder or row-closing token, and the `<s>` it writes after the image."""
        newline = getattr(self.hf, "image_newline_id", None)
        image = [i for i, t in enumerate(ids) if t in (token, newline)]
        end = image[-1] + 1
        if end < len(ids) and ids[end] == self.tokenizer.bos_token_id:
            end += 1
        return ids[:end]

    def _call_kwargs(self, modality: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """`min_pixels` / `max_pixels` (vLLM's names for Qwen2-VL) as the processor's `size`
        edges: transformers 5.17 ignores them as call kwargs, later versions read them with a
        deprecation warning; `size` works in both. Filled from the modality's own defaults (the
        image and video processors have different minimums)."""
        kwargs = {dict(_ALIASES).get(k, k): v for k, v in kwargs.items()}  # max_dynamic_patch -> max_patches
        if "min_pixels" not in kwargs and "max_pixels" not in kwargs:
            return dict(kwargs)
        sub = getattr(self.hf, "image_processor" if modality == "image" else "video_processor", None)
        size = getattr(sub, "size", None)
        read = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        edges = {k: read(k) for k in ("shortest_edge", "longest_edge")}
        if edges["longest_edge"] is None:  # not a pixel-capped processor: pass the keys through
            return dict(kwargs)
        out = dict(kwargs)
        edges.update(out.pop("size", None) or {})
        if "min_pixels" in out:
            edges["shortest_edge"] = out.pop("min_pixels")
        if "max_pixels" in out:
            edges["longest_edge"] = out.pop("max_pixels")
        out["size"] = edges
        return out

    # --- a prompt ---------------------------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer(text)["input_ids"]

    def process(self, prompt: Union[str, Sequence[int]], multi_modal_data: Optional[Mapping[str, Any]],
                mm_processor_kwargs: Optional[Mapping[str, Any]] = None) -> MultimodalPrompt:
        """Token ids with every placeholder expanded, and the items in prompt order."""
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        data = dict(multi_modal_data or {})
        items_by_modality = {}
        for modality, raw in data.items():
            if modality not in MODALITIES:
                raise MultimodalInputError(f"multi_modal_data.{modality}: unknown modality; this model takes: "
                                           f"{', '.join(self.placeholders) or 'text only'}")
            items_by_modality[modality] = _as_items(modality, raw)
        check_counts({m: len(v) for m, v in items_by_modality.items()}, self.limits, self.language_model_only)
        kwargs = self._kwargs_for(mm_processor_kwargs)

        images = len(items_by_modality.get("image", []))
        if self.places_items_itself and images and self.placeholders["image"] not in token_ids:
            token_ids = [self.placeholders["image"]] * images + token_ids  # where HF's processor puts them
        runs = {m: [i for i, t in enumerate(token_ids) if t == tok] for m, tok in self.placeholders.items()}
        for modality, items in items_by_modality.items():
            if len(runs[modality]) != len(items):
                name = self.tokenizer.convert_ids_to_tokens(self.placeholders[modality])
                raise MultimodalInputError(f"the prompt has {len(runs[modality])} {name} placeholder(s) for "
                                           f"{len(items)} {modality} item(s); write one per item (the chat "
                                           "template does)")
        for modality, positions in runs.items():
            if positions and modality not in items_by_modality:
                name = self.tokenizer.convert_ids_to_tokens(self.placeholders[modality])
                raise MultimodalInputError(f"the prompt has {len(positions)} {name} placeholder(s) but "
                                           f"multi_modal_data has no {modality}")

        found = []  # (prompt position of the placeholder, processed item)
        for modality, items in items_by_modality.items():
            for n, (pos, raw) in enumerate(zip(runs[modality], items)):
                found.append((pos, self.process_item(modality, raw, kwargs, f"multi_modal_data.{modality}[{n}]")))
        found.sort(key=lambda pair: pair[0])

        # the prompt as pieces: text of the prompt, text the processor writes around an item, an
        # item's run (never re-tokenized); then each stretch of text that holds written text is
        # tokenized as one, as the HF processor tokenizes the whole prompt
        pieces: List[Tuple[str, List[int], Optional[ProcessedItem]]] = []
        cursor = 0
        for pos, item in found:
            pieces += [("prompt", token_ids[cursor:pos], None), ("written", item.prefix_ids, None),
                       ("run", item.run_token_ids(self.run_tokens[item.modality]), item),
                       ("written", item.suffix_ids, None)]
            cursor = pos + 1
        pieces.append(("prompt", token_ids[cursor:], None))
        return self._joined(pieces)

    def _joined(self, pieces: List[Tuple[str, List[int], Optional["ProcessedItem"]]]) -> MultimodalPrompt:
        """Gemma-3's processor writes plain text around an image ("\\n\\n<start_of_image>...<end_of_image>\\n\\n")
        and tokenizes the whole prompt, so that text can merge with the prompt's text beside it
        (a template's "user\\n" + "\\n\\n" is one "\\n\\n\\n" token with Gemma's tokenizer). A stretch of
        ordinary tokens between two added tokens (which the tokenizer never merges across) that
        holds written text is decoded and tokenized again as one; other stretches stay as given."""
        boundaries = self.added_tokens
        out: List[int] = []
        placed: List[PlacedItem] = []
        if all(t in boundaries for kind, ids, _ in pieces if kind == "written" for t in ids):
            for kind, ids, item in pieces:  # nothing to join (Qwen2.5-VL, InternVL: added tokens only)
                if kind == "run":
                    placed.append(PlacedItem(len(out), item))
                out.extend(ids)
            return MultimodalPrompt(out, placed)
        stretch: List[int] = []  # ordinary tokens since the last boundary
        written = False  # the stretch holds text the processor wrote

        def flush() -> None:
            nonlocal stretch, written
            if written and stretch:
                text = self.tokenizer.decode(stretch, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                stretch = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.extend(stretch)
            stretch, written = [], False
        for kind, ids, item in pieces:
            if kind == "run":
                flush()
                placed.append(PlacedItem(len(out), item))
                out.extend(ids)
                continue
            for t in ids:
                if t in boundaries:
                    flush()
                    out.append(t)
                else:
                    stretch.append(t)
                    written = written or kind == "written"
        flush()
        return MultimodalPrompt(out, placed)


def _stretches(ids: List[int], token: int) -> List[Tuple[int, int]]:
    """[start, end) of each maximal stretch of `token` in ids."""
    out: List[Tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != token:
            continue
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _as_items(modality: str, raw: Any) -> List[Any]:
    """multi_modal_data[modality] -> its items. One image or a list of images; one video (a list of
    frames or a 4-D array) or a list of videos."""
    if not isinstance(raw, (list, tuple)):
        return [raw]
    if modality == "video":
        several = bool(raw) and (isinstance(raw[0], (list, tuple)) or getattr(raw[0], "ndim", 0) == 4)
        return list(raw) if several else [raw]
    return list(raw)
