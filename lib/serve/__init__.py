"""Serve a run's index over HTTP (FastAPI + uvicorn): OpenAI-compatible `POST /v1/embeddings`, `POST /v1/search`
(dense, bm25 or hybrid), `POST /v1/feedback` into the run's feedback.sqlite, a search page at `/`, `GET /health`
and Prometheus metrics at `GET /metrics`. Bound to 127.0.0.1 unless --host is given.

    python -m lib.serve --run dnd-default                 (make serve)
    python -m lib.serve feedback --run dnd-default --export feedback.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from lib.encoders import native_backends
from lib.facts import ExportFacts
from lib.feedback import FeedbackStore, model_version
from lib.io import read_json, write_jsonl
from lib.paths import METRICS_FILE, REPO_ROOT, Run, locate
from lib.release import ReleaseError, resolve
from lib.search import Retriever
from lib.serve.app import MAX_CONNECTIONS, OncePer, create_app, host_name, more_open_files, slow_client_protocol
from lib.serve.service import FEEDBACK_PER_MINUTE, REQUEST_SECONDS, Limits, Service
from lib.teacher.server import free_port, is_loopback_host


def serving_backend(saved: str, exported: ExportFacts) -> tuple[str, str]:
    """The backend to serve with on this machine: the index's, if this CPU runs it natively; else the fastest other
    backend that passed stage 05's gate. Returns it and a note ("" if saved)."""
    native, why_not = native_backends()
    if saved in native or saved == "custom":
        return saved, ""
    passed = [b for b in native if exported.passed(b)] or ["onnx-fp32"]
    chosen = max(passed, key=lambda b: exported.backends.get(b, {}).get("items_per_second", 0))
    return chosen, f"the index's backend {saved} does not run natively here ({why_not.get(saved, 'not available')}): serving with {chosen}"


def load_service(run: str, runs_root: str | None = None, index_dir: str | None = None, aliases: list[str] = (),
                 api_key_env: str | None = None, backend: str | None = None, limits: Limits = Limits(),
                 max_seq_length: int | None = None) -> Service:
    """A Service over a run's saved index (05_export/index; or `index_dir`), feedback in <run>/feedback.sqlite; or over
    a release (`index_dir` = models/<domain>/<version> or …/current): its index, served as the model named by its
    version, feedback in models/<domain>/feedback.sqlite (shared by the domain's versions, each row naming its own)."""
    stages = Run(run, runs_root)
    folder, index = stages.path, Path(index_dir) if index_dir else stages.index
    gate_file = index.parent / METRICS_FILE
    where = locate(index)
    if where is not None and (where.kind == "release" or where.release is not None):  # a release or its index
        release = resolve(where.release or where.path)
        run, folder, index, gate_file = release.name, release.parent, release / "index", release / "evaluation" / "export.json"
    if not (index / "retriever.json").exists():
        raise SystemExit(f"{index}/retriever.json not found: run `make all` (stage 05) for run {run!r} first")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise SystemExit(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is empty or unset")
    spec = read_json(index / "retriever.json").get("encoder", {})
    saved, backend_given = spec.get("backend", "custom"), backend is not None
    exported = ExportFacts.read(gate_file) if gate_file.exists() else ExportFacts({}, saved)  # no gate: nothing passed
    if backend is None:
        backend, note = serving_backend(saved, exported)
        if note:
            print(note, file=sys.stderr)
    reuse = backend != saved and exported.passed(backend) and exported.passed(saved)
    if reuse:
        print(f"serving with {backend} over the index's {saved} vectors: both passed stage 05's parity gate, so the "
              "corpus is not embedded again", file=sys.stderr)
    chosen_by = "--backend" if backend_given else ("the index" if backend == saved else "this CPU (the index's does not run here)")
    retriever = Retriever.load(index, backend=backend, max_seq_length=max_seq_length, reuse_vectors=reuse)
    version = model_version(index / spec.get("model_dir", "."))
    service = Service(retriever, run, version, FeedbackStore(folder / "feedback.sqlite"), aliases, api_key, limits)
    service.backend_chosen_by = chosen_by
    if not backend_given and exported.passed(backend):  # after start, the fastest gated backend for one query
        others = [b for b in native_backends()[0] if b != backend and exported.passed(b)]
        service.latency_candidates = {b: (index / spec.get("model_dir", "."), index / spec.get("export_dir", "."))
                                      for b in others}
    return service


def single_threaded_blas() -> None:
    """numpy's BLAS on one thread: the server's matrix products are small, and BLAS threads spinning after each one
    take the cores from the encoder (measured: one hybrid query over 10k items 24 → 13 ms with torch bf16)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")




def allowed_hosts(bind: str, names: list[str]) -> set[str] | None:
    """The Host names the server answers to: the bound address (and localhost's names when it is loopback) and the
    names the operator lists; None (any) when bound to every interface with no names listed."""
    if bind in ("0.0.0.0", "::") and not names:
        return None
    hosts = {host_name(bind), *(host_name(n) for n in names)}
    return hosts | {"127.0.0.1", "localhost", "::1"} if is_loopback_host(bind) else hosts


def start_server(args: list[str], log_path: str | Path, timeout: float = 180, env: dict | None = None):
    """`python -m lib.serve <args>` on a free 127.0.0.1 port in a subprocess (output to `log_path`), returned with its
    URL once /health answers; a RuntimeError with the log's tail if it exits or does not answer within `timeout`."""
    import subprocess

    import httpx

    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "lib.serve", *args, "--port", str(port)], cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    process.wait()
    raise RuntimeError(f"the server did not answer /health (exit code {process.returncode}): "
                       f"{Path(log_path).read_text()[-2000:]}")


def serve_main(argv: list[str]) -> None:
    """CLI: start the server."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m lib.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="dnd-default", help="run folder under the runs root, e.g. dnd-default")
    parser.add_argument("--runs-root", default=None, help="where runs live (default data/runs)")
    parser.add_argument("--index", default=None, help="a saved Retriever folder instead of the run's 05_export/index, or "
                        "a release (models/<domain>/current or models/<domain>/<version>)")
    parser.add_argument("--host", default=None, help="address to bind; without it 127.0.0.1 (this machine only). "
                        "0.0.0.0 opens it to the network: set --api-key-env too")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-alias", action="append", default=[], help="another name clients may send as 'model' "
                        "(e.g. text-embedding-3-small, to repoint an application unchanged); repeatable")
    parser.add_argument("--api-key-env", default=None, help="name of an environment variable holding the API key that "
                        "every route but /health and the page must send as 'Authorization: Bearer <key>'")
    parser.add_argument("--allowed-host", action="append", default=[], help="a name clients reach the server by (the "
                        "Host header) besides the bound address, e.g. a reverse proxy's; repeatable. Other names are refused "
                        "(a web page rebinding its DNS to this machine)")
    parser.add_argument("--backend", default=None, help="override the index's backend: torch-fp32, torch-bf16, onnx-fp32, onnx-int8")
    parser.add_argument("--max-seq-length", type=int, default=None, help="tokens per text (default: the index's)")
    parser.add_argument("--feedback-per-minute", type=int, default=FEEDBACK_PER_MINUTE, help="judgements one client "
                        "address may store in a minute (more answer 429); behind a proxy every client shares one address")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="connections and requests served "
                        "at once; beyond it new requests are answered 503 at once")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_SECONDS, help="seconds a client has to send a "
                        "request's head, and then its body, before the connection is closed (408 for a body)")
    args = parser.parse_args(argv)
    host = args.host or "127.0.0.1"  # only --host opens the server beyond this machine
    single_threaded_blas()
    try:
        service = load_service(args.run, args.runs_root, args.index, args.model_alias, args.api_key_env, args.backend,
                               max_seq_length=args.max_seq_length)
    except ReleaseError as error:
        raise SystemExit(f"error: {error}") from None
    service.allowed_hosts = allowed_hosts(host, args.allowed_host)
    service.request_seconds = args.request_timeout
    service.feedback_per_minute = args.feedback_per_minute
    r = service.retriever
    print(f"serving {service.run}: {len(r.items)} items, backend {r.backend}, search {r.mode}"
          f"{f' ({r.fusion})' if r.mode == 'hybrid' else ''}, model version {service.version}", flush=True)
    print(f"  page http://{host}:{args.port}/ · OpenAI base_url http://{host}:{args.port}/v1 · "
          f"API key {'required' if service.api_key else 'not required'}", flush=True)
    if not is_loopback_host(host) and not service.api_key:
        print(f"  warning: {host} is reachable from the network and no API key is set (--api-key-env)", file=sys.stderr)
    more_open_files()
    logging.getLogger("asyncio").addFilter(OncePer(10.0))
    uvicorn.run(create_app(service), host=host, port=args.port, log_level="warning", access_log=False,
                http=slow_client_protocol(args.request_timeout), limit_concurrency=args.max_connections)


def feedback_main(argv: list[str]) -> None:
    """CLI: export the run's feedback as JSONL."""
    parser = argparse.ArgumentParser(prog="python -m lib.serve feedback", description="The judgements the search page and "
                                     "POST /v1/feedback stored for a run.")
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--export", nargs="?", const="-", required=True, metavar="PATH",
                        help="write every judgement as JSONL to PATH (default: standard output)")
    args = parser.parse_args(argv)
    path = Run(args.run, args.runs_root).path / "feedback.sqlite"
    if not path.exists():
        raise SystemExit(f"{path} not found: no feedback was given for run {args.run!r} yet (python -m lib.serve --run {args.run})")
    store = FeedbackStore(path)
    rows = store.rows()
    store.close()
    if args.export == "-":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        write_jsonl(args.export, rows)
        print(f"{len(rows)} judgements → {args.export}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """python -m lib.serve [--run …] | python -m lib.serve feedback --export [PATH]."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["feedback"]:
        feedback_main(argv[1:])
    else:
        serve_main(argv[1:] if argv[:1] == ["serve"] else argv)
