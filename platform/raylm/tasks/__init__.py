"""What differs between the tasks raylm trains and serves, each in one module the shared machinery calls: how a batch
becomes a loss, which validation metrics a run reports and how they are computed from sums over the whole split,
which metric sweeps and the eval gate compare (and which way is better). The data order, DDP, checkpoints, resume,
sweeps, registry, batching and errors are the same for every task; a new task is a new module here.

Today: `causal_lm` (next-token prediction: pretraining, and the base of fine-tuning).
"""

from __future__ import annotations

from raylm.tasks.causal_lm import CausalLM

TASKS = {"causal_lm": CausalLM()}


def get_task(name: str = "causal_lm"):
    return TASKS[name]
