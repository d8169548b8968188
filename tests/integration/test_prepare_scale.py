"""prepare across nodes (ray.cluster_utils.Cluster) and in flat memory as the corpus grows."""

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from raylm.data.shards import read_manifest, read_split_blocks
from tests.conftest import ASSETS, REPO, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MULTINODE = """
import json, sys
import raylm
import ray
from ray.cluster_utils import Cluster

# The head gets no CPUs: every read and tokenize task must run on the two worker nodes.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
for _ in range(2):
    cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
from raylm.config import load_config
from raylm.data.prepare import run_prepare

summary = run_prepare(load_config(None, json.loads(sys.argv[1])))
nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({"summary": summary, "nodes": len(nodes)}))
ray.shutdown()
cluster.shutdown()
"""


def test_prepare_on_three_nodes_matches_one_node(prepared, tmp_path):
    _cfg, single = prepared
    overrides = tiny_overrides(tmp_path)
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rl-", dir="/tmp")}
    result = subprocess.run(
        [sys.executable, "-c", MULTINODE, json.dumps(overrides)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 3
    multi = out["summary"]
    for key in ("documents", "empty_documents", "tokens", "train_blocks", "val_blocks", "dropped_tokens"):
        assert multi[key] == single[key], key
    for split in ("train", "val"):
        assert np.array_equal(
            read_split_blocks(Path(multi["data_dir"]), split), read_split_blocks(Path(single["data_dir"]), split)
        )
    assert (
        read_manifest(Path(multi["data_dir"])).tokenizer.hash == read_manifest(Path(single["data_dir"])).tokenizer.hash
    )


def _tree_rss_bytes(root: int) -> int:
    """RSS of `root` and all its descendants (the embedded cluster's processes are all under the driver)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parents[int(entry.name)] = int(fields.get("PPid", "0"))
        rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in tree]
        tree.update(children)
        frontier += children
    return sum(rss.get(pid, 0) for pid in tree)


def _peak_rss_of_prepare(overrides: list[str]) -> tuple[int, dict]:
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rl-", dir="/tmp")}
    process = subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", "prepare", *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_bytes(process.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate(timeout=500)
    done.set()
    sampler.join()
    assert process.returncode == 0, stderr[-3000:]
    return peak, json.loads(stdout)


def _generated_corpus(path: Path, megabytes: float) -> None:
    """Sentences recombined from the test corpus's vocabulary, one JSON document per line."""
    words = " ".join(json.loads(line)["text"] for line in (ASSETS / "corpus.jsonl").read_text().splitlines()).split()
    rng = random.Random(0)
    target, written = int(megabytes * (1 << 20)), 0
    with path.open("w") as out:
        while written < target:
            line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(20, 120)))}) + "\n"
            out.write(line)
            written += len(line)


def test_memory_stays_flat_as_the_corpus_grows_twenty_fold(tmp_path):
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    _generated_corpus(small, 1)
    _generated_corpus(large, 20)
    common = ["data.format=jsonl", "data.seq_len=64", "data.tokenizer.vocab_size=512", "data.rows_per_shard=2048"]
    small_peak, small_summary = _peak_rss_of_prepare(
        [f"run.dir={tmp_path}", "run.name=small", f"data.paths=[{small}]", *common]
    )
    large_peak, large_summary = _peak_rss_of_prepare(
        [f"run.dir={tmp_path}", "run.name=large", f"data.paths=[{large}]", *common]
    )
    assert large_summary["tokens"] > 15 * small_summary["tokens"]
    print(f"peak RSS: small {small_peak / 2**20:.0f} MiB, large {large_peak / 2**20:.0f} MiB")
    assert large_peak <= 1.5 * small_peak
