"""Latency and throughput of `mlflow models serve`: one image a request, then batches.

    python benchmarks/serving_latency.py MODEL_URI /path/to/test [--requests 300] [--batch 100]

Starts the server on a free loopback port (as README says: --env-manager local), posts
held-out images one at a time and then in batches, one request after another over one
connection, as a client would, and prints p50/p95 latency and images per second for each.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared toolbox
import requests
from helpers import local_env, model_server_command, running
from score_server import split_body


def timed_requests(
    session: requests.Session, url: str, bodies: list[bytes]
) -> tuple[list[float], float]:
    """Each request's seconds, and the seconds for all of them, one after another."""
    latencies = []
    started = time.perf_counter()
    for body in bodies:
        sent = time.perf_counter()
        answer = session.post(f"{url}/invocations", data=body, timeout=60,
                              headers={"Content-Type": "application/json"})  # fmt: skip
        latencies.append(time.perf_counter() - sent)
        if answer.status_code != 200:
            raise SystemExit(f"{answer.status_code}: {answer.text[:300]}")
    return latencies, time.perf_counter() - started


def report(name: str, latencies: list[float], total: float, images: int) -> None:
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"{name}: {len(latencies)} requests, p50 {1000 * statistics.median(latencies):.1f} ms, "
        f"p95 {1000 * quantiles[94]:.1f} ms, {images / total:.0f} images/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_uri")
    parser.add_argument("folder")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()

    files = sorted(p for p in Path(args.folder).glob("*/*") if p.is_file())
    contents = [p.read_bytes() for p in files]
    single = [json.dumps(split_body([c])).encode() for c in contents[: args.requests]]
    batches = [
        json.dumps(split_body(contents[i : i + args.batch])).encode()
        for i in range(0, args.requests * args.batch, args.batch)
        if i + args.batch <= len(contents)
    ][: args.requests // 3]
    command = functools.partial(model_server_command, args.model_uri)
    log = Path(tempfile.mkdtemp(prefix="serving-latency-")) / "serve.log"
    server = running(command, local_env(), "/ping", log, seconds=180)
    with server as url, requests.Session() as session:
        timed_requests(session, url, single[:20] + batches[:3])  # warm up
        report("1 image a request", *timed_requests(session, url, single), len(single))
        latencies, total = timed_requests(session, url, batches)
        report(f"{args.batch} images a request", latencies, total, args.batch * len(batches))


if __name__ == "__main__":
    main()
