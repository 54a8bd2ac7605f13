"""Making torchvision importable when its compiled operators cannot load.

The torchvision wheel on the package index is built for CUDA torch. Beside a CPU build of the
same torch its `_C` library fails to load, and `import torchvision` then stops at
`torch.library.register_fake("torchvision::nms")`, which needs the operator's schema that only
`_C` would have defined. transformers imports torchvision whenever it is installed, so this
breaks even `transformers.LlamaConfig`. HF's Qwen2-VL image and video processors use only
torchvision's pure-Python transforms; defining the two schemas that torchvision's Python
registers unconditionally (`nms`, `qnms`) is enough for every import to succeed. The operators
stay without kernels: calling one raises torch's "no kernel" error, which is honest.

`framework/__init__.py` runs `prepare_torchvision()` once, before anything imports
transformers. It costs a file lookup when torchvision is absent, and where `_C` loads (the CUDA
machines) it only loads it early, as `import torchvision` would.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# the signatures torchvision's _C registers for them (csrc/ops/nms.cpp and its quantized twin)
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_state = {"result": None, "library": None}  # the schemas live as long as the Library object does


def prepare_torchvision() -> str:
    """"absent" (not installed), "native" (its operators load) or "schemas" (the shim was needed)."""
    if _state["result"] is not None:
        return _state["result"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        _state["result"] = "absent"
        return "absent"
    import torch
    libraries = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    try:
        for lib in libraries[:1]:
            torch.ops.load_library(str(lib))
        if libraries:
            _state["result"] = "native"
            return "native"
    except (OSError, RuntimeError):
        pass
    # an import attempted before this leaves half-initialised modules behind: drop them
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _state.update(result="schemas", library=library)
    return "schemas"
