"""`python -m framework.run [overrides]`: compose the config, validate it, run the chosen task.

Hydra stops here: tasks receive a plain FrameworkConfig. User errors (a bad key or value, a
missing model folder) print one line and exit with code 2. In a multirun every job records
its outcome in metrics.json, so one failing job is a row in the sweep, not a crashed sweep.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import List

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from framework.config.compose import compose, normalize_overrides, to_framework_config
from framework.config.errors import ConfigError, UserError
from framework.config.validate import validate_device_present
from framework.config.store import register_schema
from framework.tasks.metrics import write_metrics

log = logging.getLogger("framework")
USER_ERROR, NO_FIT = 2, 3


def run_task(cfg: DictConfig, run_dir: Path, overrides: List[str], multirun: bool) -> int:
    record = {"overrides": overrides, "status": "ok", "error": None}
    try:
        fcfg = to_framework_config(cfg)
        validate_device_present(fcfg)
        task = importlib.import_module(f"framework.tasks.{fcfg.task.name}")
        code = task.run(fcfg, run_dir)
        if code:
            record.update(status="failed", error=f"exit code {code}")
        return code
    except (ConfigError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        record.update(status="failed", error=str(exc))
        return USER_ERROR
    except Exception as exc:
        if not multirun:
            raise
        traceback.print_exc()  # keep the sweep going: this job becomes a failed row
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        return 1
    finally:
        write_metrics(run_dir, record)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    code = run_task(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), multirun)
    if code and not multirun:
        sys.exit(code)


def precheck(argv: List[str]) -> None:
    """Compose the command line once up front, so a bad override is one line and exit 2,
    not Hydra's multi-line report. Sweeps (-m) are checked job by job instead."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.multirun or args.help or args.hydra_help or args.info or args.shell_completion:
        return
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra.") or "searchpath" in o]
    try:
        compose(overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(USER_ERROR)


def quiet_logs() -> None:
    """Noise a newcomer should not have to read: Ray's warning that the private cluster a run
    starts uses token authentication (it does, Ray's default), and colour codes in Ray's rank
    output when the log is redirected to a file."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_logs()
    sys.argv[1:] = normalize_overrides(sys.argv[1:])  # what Hydra's grammar refuses but means one thing
    register_schema()
    precheck(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
