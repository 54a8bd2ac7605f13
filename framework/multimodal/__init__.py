"""Multimodal inputs: loading images and videos, the model folder's own HF processor, the
per-prompt limits, and the host cache of processed items.

`framework/__init__.py` has already made torchvision importable (torchvision_compat), which
HF's Qwen2-VL image and video processors need.
"""
