"""One module per `task.name`, each exposing `run(cfg: FrameworkConfig, run_dir: Path) -> int`."""
