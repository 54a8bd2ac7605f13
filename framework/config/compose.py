"""Hydra at the front door: compose YAML + overrides into a validated FrameworkConfig.

Everything past this module takes plain dataclasses; nothing else in the engine imports Hydra.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.config.errors import ConfigError
from framework.config.schema import FrameworkConfig
from framework.config.store import register_schema
from framework.config.validate import validate

# conf/ sits beside the framework package in the source tree (the README installs editable).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def to_framework_config(cfg: DictConfig) -> FrameworkConfig:
    """DictConfig (typed by the schema) -> validated dataclasses; interpolations resolved."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    _reject_unknown_keys(cfg, FrameworkConfig)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, FrameworkConfig):  # composed without the schema: type it now
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FrameworkConfig), cfg))
    return validate(obj)


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """`+cache.foo=1` slips past struct mode; the schema is still the list of valid keys."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", node[key], f"unknown key; valid keys: {', '.join(fields)}")
        factory = fields[key].default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            _reject_unknown_keys(node[key], factory, f"{prefix}{key}.")


def compose(overrides: Sequence[str] = ()) -> FrameworkConfig:
    """The library front door: `compose(["+recipe=low_mem", "cache.max_num_seqs=8"])`."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return to_framework_config(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf: turn the multi-line report into one line
        raise ConfigError(*_describe(exc)) from exc
    finally:
        GlobalHydra.instance().clear()


def _schema_keys(full_key: str) -> list[str]:
    """Valid sibling keys of `full_key` (e.g. cache.max_num_seq -> cache.*)."""
    parts = full_key.split(".")
    node: object = FrameworkConfig
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        node = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _describe(exc: BaseException) -> tuple[str, object, str]:
    """(key, value, expected) for a Hydra or OmegaConf error, whichever level raised it."""
    chain, cur = [], exc
    while cur is not None:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            key, msg = err.full_key, str(getattr(err, "msg", err)).splitlines()[0]
            if re.search(r"Key '[^']+' (is )?not in", msg) or "Missing key" in msg:
                valid = _schema_keys(key)
                if not valid:  # a new key in a free-form dict (limit_mm_per_prompt): see below
                    break
                close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
                hint = f"did you mean {key.rsplit('.', 1)[0]}.{close[0]}? " if close and "." in key else ""
                return key, _value_of(exc, key), f"unknown key; {hint}valid keys: {', '.join(valid)}"
            return key, _value_of(exc, key), msg
    text = str(exc)
    append = re.search(r"Could not override '([^']+)'.*?use \+(.+)$", text, flags=re.S | re.M)
    if append:
        key, override = append.group(1), append.group(2).strip()
        return key, None, f"new keys in this dict need Hydra's '++' (merge) prefix: ++{override}"
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if missing:
        group, choice = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return group, choice, f"no such choice; valid: {', '.join(options) or '(none found)'}"
    return "overrides", None, " ".join(text.split())[:300]


def _value_of(exc: BaseException, key: str) -> object:
    match = re.search(rf"{re.escape(key)}=(\S+)", str(exc))
    return match.group(1) if match else None
