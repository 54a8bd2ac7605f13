"""The request bodies the server accepts, as pydantic models (OpenAI's fields plus vLLM's extras).

Every field either works or is refused: an unknown field fails validation (extra="forbid"), and
the OpenAI fields we do not implement are declared only so that a value other than null can be
refused with a 400 naming them (see `refused_fields`). Types are strict: "10" is not a number.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    include_usage: StrictBool = False
    continuous_usage_stats: Optional[StrictBool] = None  # vLLM's; refused if true


class SamplingFields(Body):
    """What completions and chat completions share."""
    model: Optional[StrictStr] = None
    n: StrictInt = 1
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, List[StrictStr], None] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    user: Optional[StrictStr] = None  # an end-user id for the caller's own records: accepted, unused
    # vLLM's extensions
    top_k: Optional[StrictInt] = None
    min_p: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    min_tokens: StrictInt = 0
    stop_token_ids: Optional[List[StrictInt]] = None
    ignore_eos: StrictBool = False
    # OpenAI fields not implemented: any value but null is a 400 naming the field
    logit_bias: Optional[Dict[str, Any]] = None


class CompletionRequest(SamplingFields):
    prompt: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]]
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = None  # the top-k count; 0 = the sampled token only
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = None


class TextPart(Body):
    type: Literal["text"]
    text: StrictStr


class ImagePart(Body):  # parsed so that it can be refused by name until images are served
    type: Literal["image_url"]
    image_url: Dict[str, Any]


class ChatMessage(Body):
    role: StrictStr
    content: Union[StrictStr, List[Union[TextPart, ImagePart]]]
    name: Optional[StrictStr] = None


class ChatCompletionRequest(SamplingFields):
    messages: List[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = None
    # OpenAI fields not implemented
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[StrictBool] = None
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[Dict[str, Any]] = None
    audio: Optional[Dict[str, Any]] = None
    modalities: Optional[List[Any]] = None
    prediction: Optional[Dict[str, Any]] = None
    reasoning_effort: Optional[StrictStr] = None
    service_tier: Optional[StrictStr] = None
    store: Optional[StrictBool] = None
    metadata: Optional[Dict[str, Any]] = None
    web_search_options: Optional[Dict[str, Any]] = None


class TokenizeRequest(Body):
    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(Body):
    model: Optional[StrictStr] = None
    tokens: List[StrictInt]


NOT_IMPLEMENTED = ("logit_bias", "suffix", "tools", "tool_choice", "parallel_tool_calls", "functions",
                   "function_call", "response_format", "audio", "modalities", "prediction",
                   "reasoning_effort", "service_tier", "store", "metadata", "web_search_options")


def refused_fields(request: BaseModel) -> Optional[str]:
    """The first field set to something this server does not implement, or None."""
    for name in NOT_IMPLEMENTED:
        if getattr(request, name, None) is not None:
            return name
    return None
