"""Where a model's files are: a local folder, a bundled model, or the local HF hub cache."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from framework.config.errors import ConfigError, UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def resolve_model_path(path: str) -> Path:
    """Never downloads: a hub id must already be in the local HF cache."""
    looked: List[str] = []
    for candidate in dict.fromkeys((Path(path).expanduser(), ASSETS / path, ASSETS / "shapes" / path)):
        looked.append(str(candidate))
        if (candidate / "config.json").is_file():
            return candidate
    if "/" in path and not Path(path).is_absolute():
        cached = hub_snapshot(path)
        if cached is not None:
            return cached
        looked.append(hub_cache_text())
    raise UserError(f"model.path={path!r}: no config.json found; looked in {', '.join(looked)}")


def hub_snapshot(repo_id: str) -> Optional[Path]:
    """A hub id's folder in the local HF cache, or None (offline and not cached)."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def hub_cache_text() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE
    return f"the HF hub cache {HF_HUB_CACHE} (never downloaded: no network at run time)"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in TOKENIZER_FILES)


def resolve_tokenizer_path(value: str, key: str = "model.tokenizer") -> Path:
    """model.tokenizer: a folder holding a tokenizer, or a hub id already in the local HF cache.
    Set and not found is an error, never a silent fall-back to token-id prompts."""
    folder = Path(value).expanduser()
    if has_tokenizer(folder):
        return folder
    where = f"{folder} has none of {', '.join(TOKENIZER_FILES)}"
    if "/" in value and not folder.is_absolute() and not folder.exists():
        cached = hub_snapshot(value)
        if cached is not None and has_tokenizer(cached):
            return cached
        if cached is None:
            where = f"no such folder, and not in {hub_cache_text()}"
    raise ConfigError(key, value, f"no tokenizer found: {where}")


def load_hf_config(path: Path) -> Any:
    """config.json through transformers; InternVL2's own layout (internvl_chat, defined only by the
    checkpoint's code) is read into transformers' InternVL config without running that code."""
    import json
    from transformers import AutoConfig
    file = Path(path) / "config.json"
    if file.is_file():
        raw = json.loads(file.read_text())
        if raw.get("model_type") == "internvl_chat":
            from framework.models.internvl_chat import native_config
            return native_config(raw)
    return AutoConfig.from_pretrained(str(path))
