"""Registers the schema with Hydra, so composed YAML is typed and checked key by key."""
from hydra.core.config_store import ConfigStore

from framework.config.schema import FrameworkConfig


def register_schema() -> None:
    ConfigStore.instance().store(name="framework_schema", node=FrameworkConfig)
