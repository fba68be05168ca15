"""Latency and throughput of `mlflow models serve`: one image a request, then batches.

    python benchmarks/serving_latency.py MODEL_URI /path/to/test [--requests 300] [--batch 100]

Starts the server on a free loopback port (as README says: --env-manager local), posts
held-out images one at a time and then in batches, one request after another over one
connection, as a client would, and prints p50/p95 latency and images per second for each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests
from score_server import split_body


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if requests.get(f"{url}/ping", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer within {seconds:.0f} s")


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
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    # The server starts `uvicorn` from PATH: this interpreter's, whether or not it is active.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as server:  # fmt: skip
        try:
            wait_until_up(url, server)
            with requests.Session() as session:
                timed_requests(session, url, single[:20] + batches[:3])  # warm up
                report("1 image a request", *timed_requests(session, url, single), len(single))
                latencies, total = timed_requests(session, url, batches)
                report(
                    f"{args.batch} images a request", latencies, total, args.batch * len(batches)
                )
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
