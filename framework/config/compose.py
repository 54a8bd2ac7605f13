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


def _dict_keys(schema: type = FrameworkConfig, prefix: str = "") -> list[str]:
    """Schema keys holding free-form dicts (multimodal.limit_mm_per_prompt, ...)."""
    keys = []
    for f in dataclasses.fields(schema):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            keys += _dict_keys(f.default_factory, f"{prefix}{f.name}.")
        elif str(f.type).startswith(("Dict", "dict")):
            keys.append(prefix + f.name)
    return keys


def normalize_overrides(overrides: Sequence[str]) -> list[str]:
    """What users type that Hydra's grammar refuses but means one thing, made to mean it:
    a dict key (`multimodal.limit_mm_per_prompt={image: 2}` or `...limit_mm_per_prompt.image=2`)
    adds keys to a typed dict, which Hydra allows only as `++`; a value starting with `~`
    (`model.path=~/x`, unexpanded by the shell) must be quoted for Hydra's lexer."""
    dict_keys = _dict_keys()
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or override.startswith("-"):
            out.append(override)
            continue
        if value.startswith("~") and "'" not in value and "," not in value:
            override = f"{key}='{value}'"
        if not key.startswith(("+", "~")) and any(key == k or key.startswith(k + ".") for k in dict_keys):
            override = "++" + override
        out.append(override)
    return out


def compose(overrides: Sequence[str] = ()) -> FrameworkConfig:
    """The library front door: `compose(["+recipe=low_mem", "cache.max_num_seqs=8"])`."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    overrides = normalize_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return to_framework_config(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf: turn the multi-line report into one line
        raise ConfigError(*_describe(exc, overrides)) from exc
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


def _describe(exc: BaseException, overrides: Sequence[str] = ()) -> tuple[str, object, str]:
    """(key, value, expected) for a Hydra or OmegaConf error, whichever level raised it; the value
    is the one the user gave, read back from the overrides where the error does not carry it."""
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
                given = _value_of(f"{exc} {err}", key, overrides)
                return key, given, f"unknown key; {hint}valid keys: {', '.join(valid)}"
            return key, _value_of(f"{exc} {err}", key, overrides), msg
    text = str(exc)
    append = re.search(r"Could not override '([^']+)'.*?use \+(.+)$", text, flags=re.S | re.M)
    if append:
        key, override = append.group(1), append.group(2).strip()
        value = override.partition("=")[2]
        if "." not in key:  # a config group that is not in the defaults list (recipe): `+` selects it
            return key, value, f"{key} is an optional config group; select it with +{override}"
        return key, value, f"new keys in this dict need Hydra's '++' (merge) prefix: ++{override}"
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if missing:
        group, choice = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return group, choice, f"no such choice; valid: {', '.join(options) or '(none found)'}"
    fragment = re.search(r"at input '(.+?)'", text)
    for override in overrides:  # the grammar refused one override: name it whole
        if override in text or (fragment and fragment.group(1) in override):
            key, _, value = override.partition("=")
            return key.lstrip("+~"), value, ("Hydra cannot parse this value; quote it for Hydra, e.g. "
                                             f"'{key}=\"{value}\"' (single quotes outside for the shell)")
    return "overrides", " ".join(overrides), " ".join(text.split())[:300]


def _value_of(text: str, key: str, overrides: Sequence[str] = ()) -> object:
    """The value given for `key`: from the overrides, else from the error's text."""
    given = {name.lstrip("+~"): value for name, sep, value in (o.partition("=") for o in overrides) if sep}
    if key in given:
        return given[key]
    match = re.search(rf"{re.escape(key)}=(\S+)", text) or re.search(r"Value '(.+?)'", text)
    if match:
        return match.group(1)
    within = [v for name, v in given.items() if key.startswith(name + ".")]  # a key inside a dict given whole
    return within[0] if within else "(not given on the command line)"
