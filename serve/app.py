"""The raylm model server as a Ray Serve application builder, for Serve's own tooling.

    serve run serve.app:app config=jobs/configs/tiny.yaml                   # a registered model, `<name>:latest`
    serve run serve.app:app config=jobs/configs/tiny.yaml model=tiny:best serve.max_batch_size=16
    serve deploy serve/config.yaml                                          # on a running cluster

`raylm serve` does the same and also checks the bind address, waits until the model answers, and prints its URL.
The API key comes from RAYLM_API_KEY (or `serve.api_key_file`) in the environment of the process that builds the
app; only its hash reaches the deployment.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cluster import local_cores
from raylm.config import load_config
from raylm.serving.server import compose_app


def build_app(args: dict[str, str]):
    """Serve application builder: `config` (a YAML path), `model` (registry reference or directory), and any dotted
    config override such as `serve.max_batch_size=16`."""
    args = dict(args)
    config = args.pop("config", "jobs/configs/tiny.yaml")
    model = args.pop("model", None)
    overrides = [f"{key}={value}" for key, value in args.items()] + ([f"serve.model={model}"] if model else [])
    cfg = load_config(config, overrides)
    return compose_app(cfg, threads=cfg.serve.threads or local_cores())


app = build_app
"""`serve run serve.app:app key=value ...`: Serve calls a builder with the command line's arguments."""
