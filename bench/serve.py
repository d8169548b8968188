"""Requests/s of the batched Serve deployment ÷ a bare uvicorn + FastAPI server that calls the same model one
request at a time, both under 16 concurrent clients (see shared BENCHMARKS.md); and the no-op route's extra p50
latency through Serve (`/healthz` on both, one request at a time).

Both servers load the same model directory (the tiny preset, random weights, a BPE tokenizer trained here) with the
same torch threads and generate with the same code (`raylm.serving.generate`); the bare server holds a lock so its
model runs one request at a time, which is what a FastAPI app without batching does. Workloads alternate (Serve,
bare, then bare, Serve) over the repeats; the clients are one asyncio process of 16 connections.

    python bench/serve.py            # 3 repeats x 20 s per server, 500 no-op requests each
    python bench/serve.py --quick    # 1 repeat x 8 s, 200 no-op requests
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from raylm.cluster import local_cores  # noqa: E402

TARGET, NOOP_TARGET_MS = 1.5, 3.0
CONCURRENCY = 16
BODY = {"prompt": "The old miller walked down to the river", "max_tokens": 32, "temperature": 0}


def make_model(directory: Path, seq_len: int) -> None:
    """The tiny preset with random weights and a BPE tokenizer trained on the standard library's docs."""
    import torch

    from raylm.config import ModelSection
    from raylm.data.tokenizer import train_bpe
    from raylm.models import build_model

    texts = [(module.__doc__ or "") for module in (json, asyncio, argparse, statistics, subprocess, os)] * 20
    tokenizer = train_bpe(texts, vocab_size=512)
    torch.manual_seed(0)
    model = build_model(ModelSection(), len(tokenizer), seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


BARE_SERVER = """
import sys, threading
sys.path.insert(0, {platform!r})
import torch, uvicorn
from fastapi import FastAPI
from transformers import AutoTokenizer
from raylm.models import load_pretrained
from raylm.serving.generate import GenerationRequest, generate_batch

torch.set_num_threads({threads})
tokenizer = AutoTokenizer.from_pretrained({model!r})
model = load_pretrained({model!r}).eval()
lock = threading.Lock()
app = FastAPI()

@app.get("/healthz")
async def healthz():
    return {{"status": "ok"}}

@app.post("/v1/completions")
def completions(body: dict):  # a sync route: FastAPI runs it in its thread pool; the lock makes it one at a time
    ids = tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
    request = GenerationRequest(ids, body["max_tokens"], body.get("temperature", 1.0))
    with lock:
        (result,) = generate_batch(model, tokenizer, [request])
    return {{"choices": [{{"index": 0, "text": result.text, "finish_reason": result.finish_reason}}]}}

uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_bare(model_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    from raylm.serving.server import wait_until_healthy

    port = free_port()
    source = BARE_SERVER.format(platform=str(REPO / "platform"), model=str(model_dir), port=port, threads=threads)
    process = subprocess.Popen([sys.executable, "-c", source])
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, 120)
    return process, url


def start_serve(model_dir: Path, threads: int, overrides: list[str], stack: contextlib.ExitStack) -> str:
    from raylm.cluster import ray_session
    from raylm.config import load_config
    from raylm.serving.server import start_serving

    overrides = [f"serve.model={model_dir}", f"serve.port={free_port()}", f"serve.threads={threads}", *overrides]
    cfg = load_config(None, overrides)
    plan = stack.enter_context(ray_session(cfg))  # embedded Ray, kept for the whole benchmark
    return start_serving(cfg, plan)["url"]


def start_serve_floor(serve_url: str) -> str:
    """Serve's own floor beside raylm's app, behind the same proxy: a FastAPI ingress whose `/healthz` returns a
    constant (no raylm code). raylm's share of the no-op latency is its no-op p50 minus this one's."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Floor:
        pass

    serve.run(Floor.bind(), name="floor", route_prefix="/floor")
    return f"{serve_url}/floor"


async def load(url: str, seconds: float, concurrency: int = CONCURRENCY) -> dict[str, float]:
    """`concurrency` clients posting completions back to back for `seconds`: requests/s, errors, latencies."""
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = await session.post("/v1/completions", json=BODY)
            if response.status_code == 200:
                latencies.append(time.monotonic() - started)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as session:
        await client_warmup(session)
        started = time.monotonic()
        deadline = started + seconds
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "errors": errors,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


async def client_warmup(session) -> None:
    for _ in range(3):
        await session.post("/v1/completions", json=BODY)


def noop_p50_ms(url: str, requests: int) -> float:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(20):
            client.get("/healthz")
        latencies = []
        for _ in range(requests):
            started = time.perf_counter()
            client.get("/healthz").raise_for_status()
            latencies.append(time.perf_counter() - started)
    return 1000 * statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server's model")
    parser.add_argument("overrides", nargs="*", help="raylm config overrides for the Serve side (serve.*)")
    args = parser.parse_args()
    repeats, seconds, noop_requests = (1, 8.0, 200) if args.quick else (3, 20.0, 500)
    repeats, seconds = args.repeats or repeats, args.seconds or seconds

    work = Path(tempfile.mkdtemp(prefix="raylm-bench-serve-"))
    model_dir = work / "model"
    make_model(model_dir, seq_len=256)
    bare, bare_url = start_bare(model_dir, args.threads)
    with contextlib.ExitStack() as stack:
        stack.callback(bare.terminate)
        serve_url = start_serve(model_dir, args.threads, args.overrides, stack)
        floor_url = start_serve_floor(serve_url)
        runs = []
        for repeat in range(repeats):
            order = [("serve", serve_url), ("bare", bare_url)]
            order = order if repeat % 2 == 0 else order[::-1]
            measured = {name: asyncio.run(load(url, seconds)) for name, url in order}
            noop = {name: noop_p50_ms(url, noop_requests) for name, url in [*order, ("serve_floor", floor_url)]}
            runs.append({"measured": measured, "noop": noop})
            print(f"repeat {repeat}: {json.dumps(runs[-1])}", file=sys.stderr)
    ratios = [r["measured"]["serve"]["rps"] / r["measured"]["bare"]["rps"] for r in runs]
    deltas = [r["noop"]["serve"] - r["noop"]["bare"] for r in runs]
    ratio, delta = statistics.median(ratios), statistics.median(deltas)
    middle = runs[ratios.index(ratio)] if ratio in ratios else runs[0]
    errors = sum(r["measured"][name]["errors"] for r in runs for name in ("serve", "bare"))
    print(
        json.dumps(
            {
                "bench": "serve",
                "ratio": round(ratio, 3),
                "target": TARGET,
                "noop_delta_p50_ms": round(delta, 2),
                "noop_target_ms": NOOP_TARGET_MS,
                "pass": ratio >= TARGET and delta <= NOOP_TARGET_MS and errors == 0,
                "serve_rps": round(middle["measured"]["serve"]["rps"], 1),
                "bare_rps": round(middle["measured"]["bare"]["rps"], 1),
                "serve_p50_ms": round(middle["measured"]["serve"]["p50_ms"], 1),
                "bare_p50_ms": round(middle["measured"]["bare"]["p50_ms"], 1),
                "serve_p99_ms": round(middle["measured"]["serve"]["p99_ms"], 1),
                "bare_p99_ms": round(middle["measured"]["bare"]["p99_ms"], 1),
                "noop_serve_p50_ms": round(middle["noop"]["serve"], 2),
                "noop_bare_p50_ms": round(middle["noop"]["bare"], 2),
                # Serve's own floor on this machine (a constant route, same proxy), and what raylm adds to it.
                "noop_serve_floor_p50_ms": round(middle["noop"]["serve_floor"], 2),
                "noop_raylm_share_ms": round(
                    statistics.median(r["noop"]["serve"] - r["noop"]["serve_floor"] for r in runs), 2
                ),
                "errors": errors,
                "concurrency": CONCURRENCY,
                "max_tokens": BODY["max_tokens"],
                "threads": args.threads,
                "overrides": args.overrides,
                "seconds": seconds,
                "repeats": repeats,
                "spread": round((max(ratios) - min(ratios)) / ratio, 3),
                "cores": local_cores(),
            }
        )
    )


if __name__ == "__main__":
    main()
