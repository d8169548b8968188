"""The eval gate: whether a newly registered version is promoted to `<name>:best`.

Checks (`registry.gate`; every enabled one must pass):
- `max_val_ppl`: the candidate's validation perplexity is under this threshold;
- `compare_to_best` (default): its validation loss is lower than the current best's on the same validation data.
  When the best was measured on other shards (another data-manifest hash), the best is evaluated again on the
  candidate's validation split; when the two models use different tokenizers their perplexities are not comparable
  and the check fails (`raylm models promote` promotes by hand). With no best yet, the check passes.

The candidate's loss is the one its training run or trial reported on this run's validation split; a checkpoint
registered explicitly (no reported loss) is measured on that split here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from raylm.config import GateSection
from raylm.data.shards import MANIFEST, read_manifest, shards_fingerprint
from raylm.digests import tokenizer_hash
from raylm.models import load_pretrained
from raylm.registry.store import ModelVersion, RegistryError
from raylm.storage import Location
from raylm.tasks import get_task
from raylm.train.evaluate import evaluate, perplexity, val_share

EVAL_BATCH = 8


def data_identity(data_dir: Location) -> tuple[str | None, str | None]:
    """(the shards' fingerprint, their tokenizer's hash), or (None, None) when the run has no prepared data.
    The fingerprint leaves out when the manifest was written, so preparing the same data again keeps it."""
    if not (data_dir / MANIFEST).is_file():
        return None, None
    manifest = read_manifest(data_dir)
    return shards_fingerprint(manifest), manifest.tokenizer.hash


def measure(model_dir: Location, data_dir: Location) -> dict[str, float]:
    """A registered model's loss over the whole validation split of `data_dir`: val_loss, val_ppl, val_tokens.

    Runs in the driver process, on CPU, without Ray: registering needs no cluster (`raylm register` runs without
    one), registered models are small enough to evaluate in seconds to minutes, and one process holding the whole
    split needs no process group (`evaluate` all-reduces only when world_size > 1)."""
    share = val_share(data_dir, rank=0, world_size=1)
    if not len(share):
        raise RegistryError(f"the eval gate cannot measure {model_dir}: the validation split in {data_dir} is empty")
    with tempfile.TemporaryDirectory(prefix="raylm-gate-") as tmp:
        local = model_dir.local if model_dir.is_local else model_dir.download(Path(tmp) / "model")
        model = load_pretrained(str(local))
    return evaluate(model, share, EVAL_BATCH)


def decide(
    section: GateSection,
    candidate_dir: Location,
    metrics: dict[str, Any],
    data_dir: Location,
    data_hash: str | None,
    data_tokenizer: str | None,
    best: ModelVersion | None,
) -> dict[str, Any]:
    """The gate's decision for the model in `candidate_dir`, whose reported metrics are `metrics` (measured on the
    validation split of `data_dir`, whose shards have the fingerprint `data_hash`). `best` is the current best."""
    tokenizer = tokenizer_hash(candidate_dir)
    loss, measured = metrics.get("val_loss"), False
    if loss is None and data_hash is not None and tokenizer == data_tokenizer:
        loss, measured = measure(candidate_dir, data_dir)["val_loss"], True
    decision: dict[str, Any] = {
        "passed": False,
        "reason": "",
        "candidate_val_loss": loss,
        "candidate_val_ppl": perplexity(loss),
        "candidate_measured": measured,
        "data_manifest_hash": data_hash,
        "max_val_ppl": section.max_val_ppl,
        "compare_to_best": section.compare_to_best,
        "best_version": None,
        "best_val_loss": None,
        "best_val_ppl": None,
        "best_reevaluated": False,
    }
    passes: list[str] = []
    failures: list[str] = []
    if loss is None and (section.max_val_ppl is not None or section.compare_to_best):
        failures.append(
            "no validation loss for this model (none was reported, and this run's shards were not made with its "
            "tokenizer, so it cannot be measured on them)"
        )
    elif section.max_val_ppl is not None:
        ppl = perplexity(loss)
        verdict = passes if ppl < section.max_val_ppl else failures
        relation = "under" if verdict is passes else "not under"
        verdict.append(f"val_ppl {ppl:.4g} is {relation} registry.gate.max_val_ppl={section.max_val_ppl:g}")
    if section.compare_to_best and loss is not None:
        _compare_to_best(decision, best, tokenizer, loss, data_dir, data_hash, passes, failures)
    if not section.compare_to_best and section.max_val_ppl is None:
        passes.append("the eval gate has no checks enabled")
    decision["passed"] = not failures
    decision["reason"] = "; ".join(failures or passes)
    return decision


def _compare_to_best(
    decision: dict[str, Any],
    best: ModelVersion | None,
    tokenizer: str | None,
    loss: float,
    data_dir: Location,
    data_hash: str | None,
    passes: list[str],
    failures: list[str],
) -> None:
    if best is None:
        passes.append("no version was promoted before: the first best")
        return
    decision["best_version"] = best.version
    if best.tokenizer_hash != tokenizer:
        failures.append(
            f"the current best {best.ref} uses another tokenizer, so their perplexities are not comparable "
            "(promote by hand with `raylm models promote`)"
        )
        return
    best_loss = best.val_loss
    where = "on the same validation data"
    if data_hash is None or best.manifest.get("data_manifest_hash") != data_hash or best_loss is None:
        if data_hash is None:
            failures.append(f"this run has no prepared validation data to re-evaluate the current best {best.ref} on")
            return
        # Measured on other shards: evaluate the best again on the candidate's validation split.
        best_loss = measure(best.path, data_dir)["val_loss"]
        decision["best_reevaluated"] = True
        where = "re-evaluated on this run's validation data"
    decision["best_val_loss"], decision["best_val_ppl"] = best_loss, perplexity(best_loss)
    ours, theirs = perplexity(loss), perplexity(best_loss)
    if get_task().better(loss, best_loss):
        passes.append(f"val_ppl {ours:.4g} beats the current best {best.ref}'s {theirs:.4g} ({where})")
    else:
        failures.append(f"val_ppl {ours:.4g} is not better than the current best {best.ref}'s {theirs:.4g} ({where})")
