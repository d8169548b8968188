"""The whole pipeline from one config: prepare -> tune (or train) -> gate + register -> serve the best.

Each stage reuses what an earlier run with the same `run.name` produced, so a rerun after a failure picks up where
it stopped. With `ask`, the pipeline sends one completion request to the model it is serving, stops serving and
returns; without it, the caller keeps the server up.
"""

from __future__ import annotations

from typing import Any

from raylm.cluster import ResourcePlan
from raylm.config import Config
from raylm.data.prepare import run_prepare
from raylm.progress import plain, say
from raylm.registry.register import run_register
from raylm.serving.server import api_key, complete, start_serving, stop_serving
from raylm.train.trainer import run_train
from raylm.tune.sweep import run_tune


def run_pipeline(
    cfg: Config, plan: ResourcePlan, restart: bool = False, ask: str | None = None, max_tokens: int = 48
) -> dict[str, Any]:
    stages: dict[str, Any] = {"prepare": run_prepare(cfg, restart, plan.tokenize_actors)}
    if cfg.tune.enabled:
        stages["tune"] = run_tune(cfg, plan, restart)
    else:
        stages["train"] = run_train(cfg, plan, restart)
    stages["register"] = run_register(cfg)  # the eval gate decides whether it becomes `best`
    if cfg.serve.model is None:
        served = served_version(stages["register"])
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model": served})})
    stages["serve"] = start_serving(cfg, plan)
    summary: dict[str, Any] = {"stage": "pipeline", **stages}
    if ask is not None:
        try:
            # Sampled, not greedy: a small model's greedy text soon repeats one token; the seed keeps it repeatable.
            response = complete(
                stages["serve"]["url"], ask, max_tokens, key=api_key(cfg.serve), temperature=0.8, top_p=0.95, seed=0
            )
        finally:
            stop_serving()
        text = response["choices"][0]["text"]
        say(
            f"[bold]model {stages['register']['model']} completes[/bold] {plain(repr(ask))} [bold]with:[/bold]\n"
            f"{plain(ask + text)}"
        )
        summary["completion"] = {"prompt": ask, "text": text, "usage": response["usage"]}
    return summary


def served_version(registered: dict[str, Any]) -> str:
    """The best version (pinned by number, so a concurrent promotion cannot change what this pipeline serves): the
    one just registered when it passed the gate, the earlier best when it did not, and the new one when nothing was
    ever promoted (a first model that failed a threshold is still served, with the gate's reason said)."""
    if registered["best"] is None:
        say(f"pipeline: no {registered['name']}:best yet; serving {registered['model']} as registered")
        return registered["model"]
    if registered["best"] != registered["model"]:
        say(f"pipeline: serving {registered['best']} (the best); {registered['model']} did not pass the gate")
    return registered["best"]
