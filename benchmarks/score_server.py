"""Score a running model server on a folder of held-out images, posted as base64 JPEG/PNG.

    python benchmarks/score_server.py http://127.0.0.1:5001 /path/to/test [--batch 100]

Prints the accuracy, the requests sent and the latency per image and per request; then posts
a set of malformed requests and counts the 4xx answers, and checks the server still answers.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import requests


def post(url: str, body: dict | bytes) -> tuple[int, dict]:
    """The status and JSON answer of the server's /invocations to `body`."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = requests.post(f"{url}/invocations", data=payload, timeout=120,
                           headers={"Content-Type": "application/json"})  # fmt: skip
    return answer.status_code, answer.json() if answer.content else {}


def split_body(contents: list[bytes]) -> dict:
    data = [[base64.b64encode(c).decode()] for c in contents]
    return {"dataframe_split": {"columns": ["image"], "data": data}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("folder")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()

    files = sorted(p for p in Path(args.folder).glob("*/*") if p.is_file())
    correct = requests = 0
    started = time.perf_counter()
    for i in range(0, len(files), args.batch):
        chunk = files[i : i + args.batch]
        status, answer = post(args.url, split_body([p.read_bytes() for p in chunk]))
        requests += 1
        if status != 200:
            raise SystemExit(f"request {requests} failed: {status} {answer}")
        labels = [row["label"] for row in answer["predictions"]]
        correct += sum(label == p.parent.name for label, p in zip(labels, chunk, strict=True))
    seconds = time.perf_counter() - started
    print(
        f"{correct}/{len(files)} correct = {correct / len(files):.2%}; {requests} requests of "
        f"up to {args.batch} images; {1000 * seconds / len(files):.2f} ms per image, "
        f"{1000 * seconds / requests:.0f} ms per request"
    )

    good = files[0].read_bytes()
    malformed = {
        "not JSON": b"{nope",
        "not an image": split_body([b"hello"]),
        "truncated image": split_body([good[: len(good) // 2]]),
        "wrong column": {"dataframe_split": {"columns": ["img"], "data": [["aGVsbG8="]]}},
        "random bytes": split_body([bytes(range(256)) * 8]),
        "wrong JSON shape": {"dataframe_split": {"data": "image"}},
    }
    fours = 0
    for name, body in malformed.items():
        status, answer = post(args.url, body)
        fours += 400 <= status < 500
        message = str(answer.get("message", ""))
        one_line = "\n" not in message and "stack_trace" not in answer
        print(f"  {name}: {status} {'one line' if one_line else 'MULTI-LINE'}: {message[:120]}")
    status, _ = post(args.url, split_body([good]))
    print(
        f"{fours}/{len(malformed)} malformed requests got 4xx; a good request after them: {status}"
    )


if __name__ == "__main__":
    main()
