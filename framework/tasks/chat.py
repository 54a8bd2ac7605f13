"""task=chat: like generate, each prompt wrapped in the tokenizer's chat template."""
from pathlib import Path

from framework.config.schema import FrameworkConfig
from framework.tasks import generate


def run(cfg: FrameworkConfig, run_dir: Path) -> int:
    return generate.run(cfg, run_dir, chat=True)
