"""An OpenAI-compatible /v1/embeddings on 127.0.0.1 that waits `--latency` seconds per request before answering
(a deterministic vector per text, as float lists or, when the request asks for `encoding_format: base64` as the
openai client does by default, base64 float32 like the real API; usage in words): a remote API's round trip without the network, to measure what
concurrent teacher requests buy. Prints its base_url on the first line of stdout, then serves until killed.

    python bench/loopback_teacher.py --latency 0.2 [--port 0] [--dim 384]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def vector(text: str, dim: int) -> np.ndarray:
    """A deterministic float32 unit vector for `text` (seeded by its sha256)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    values = np.random.default_rng(seed).normal(size=dim)
    return (values / np.linalg.norm(values)).astype(np.float32)


def encoded(values: np.ndarray, encoding_format: str) -> str | list[float]:
    """An embedding as the API returns it: base64 of little-endian float32, or a list of floats."""
    if encoding_format == "base64":
        return base64.b64encode(values.astype("<f4").tobytes()).decode()
    return values.tolist()


def handler(latency: float, dim: int, log: str = "") -> type[BaseHTTPRequestHandler]:
    """The request handler: /health, and /v1/embeddings after `latency` seconds (each answered request's texts
    appended to `log` as a JSON line once its answer is sent, when given)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as API servers do

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.answer(200 if self.path == "/health" else 404, {"status": "ok"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            tokens = sum(len(t.split()) for t in texts)
            form = body.get("encoding_format", "float")
            self.answer(200, {"object": "list", "model": body.get("model", "loopback"),
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                              "data": [{"object": "embedding", "index": n, "embedding": encoded(vector(t, dim), form)}
                                       for n, t in enumerate(texts)]})
            if log:
                with open(log, "a") as out:
                    out.write(json.dumps(texts) + "\n")

        def answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds each request waits before its answer")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--log", default="", help="a file to append each answered request's texts to (JSON lines)")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(args.latency, args.dim, args.log))
    server.daemon_threads = True
    print(f"http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
