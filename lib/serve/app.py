"""The HTTP face of the server: the FastAPI app and its routes, the guard in front of them (API key, cross-site
requests, rate of connections), the slow-client protocol and the access log's rate limit."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import time
from pathlib import Path

from fastapi import Request  # at module level: the routes' annotations are resolved here

from lib.domains.records import utf8_encodable
from lib.serve.service import ApiError, Service

PAGE = Path(__file__).with_name("search_page.html")
OPEN_ROUTES = ("/health", "/")  # no API key needed: the liveness probe and the page's own HTML (its calls need it)
MAX_CONNECTIONS = 512  # connections and requests at once; more are answered 503 at once instead of queueing


def slow_client_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline for each request's head: a connection that opens and sends nothing, or
    drips its headers (slowloris), is closed after `seconds` instead of holding a socket for ever. (The body has its
    own deadline in json_body; idle keep-alive connections close after uvicorn's 5 s.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_deadline = None
            self.arm()

        def waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def arm(self) -> None:
            if self.head_deadline is None:
                self.head_deadline = self.loop.call_later(seconds, self.too_slow)

        def disarm(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def data_received(self, data: bytes) -> None:
            if self.waiting_for_head():
                self.arm()
            super().data_received(data)
            if not self.waiting_for_head():  # the head is in: the app runs
                self.disarm()

        def too_slow(self) -> None:
            self.head_deadline = None
            if self.waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

    return DeadlineH11Protocol


class OncePer(logging.Filter):
    """A log filter passing a repeated message at most once per `seconds` (asyncio logs a failed accept() — out of
    file descriptors under a flood of connections — once per attempt, hundreds of thousands of lines)."""

    def __init__(self, seconds: float = 10.0):
        super().__init__()
        self.seconds, self.last = seconds, {}

    def filter(self, record: logging.LogRecord) -> bool:
        now, key = time.monotonic(), record.getMessage()[:200]
        if now - self.last.get(key, -self.seconds) < self.seconds:
            return False
        self.last[key] = now
        return True


def more_open_files() -> None:
    """Raise this process's open-file limit to its hard limit: each client holds one, and the default soft limit
    (often 1,024) is the first to run out under many connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))


class Guard:
    """ASGI middleware around every request: the API key, any unexpected error answered as JSON (the server goes
    on), and the request count and latency per route. (Plain ASGI: FastAPI's @app.middleware costs a millisecond.)"""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.expected = service.api_key.encode() if service.api_key else None

    def authorised(self, headers: dict) -> bool:
        """Whether the request sends the API key as 'Authorization: Bearer <key>' (the scheme in any case)."""
        scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)

    def cross_site(self, method: str, headers: dict) -> ApiError | None:
        """A request this server must not answer: a Host it does not go by (a DNS-rebinding page reading the API), or
        a write sent by a web page of another origin (a form or fetch forging feedback)."""
        host = headers.get(b"host", b"").decode("latin-1")
        if self.service.allowed_hosts is not None and host_name(host) not in self.service.allowed_hosts:
            return ApiError(421, f"Host {host!r} is not a name this server answers to ({sorted(self.service.allowed_hosts)}): "
                            "start it with --allowed-host <name> for each name clients use")
        origin = headers.get(b"origin")
        if method not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            netloc = origin.decode("latin-1").partition("://")[2].rstrip("/")
            if netloc.lower() != host.lower():
                return ApiError(403, f"a {method} from the web page of {origin.decode('latin-1')!r} is refused: only this "
                                "server's own page (or a client that sends no Origin) may write")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        route, start, status = scope["path"], time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            refused = self.cross_site(scope["method"], headers)
            trusted = bool(self.expected) and self.authorised(headers)  # its judgements train in full
            if refused is None and self.expected and route not in OPEN_ROUTES and not trusted:
                refused = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
            scope.setdefault("state", {})["trusted"] = trusted
            if refused is not None:
                await JSONResponse(refused.body(), status_code=refused.status)(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except Exception as error:  # nothing a request sends may take the server down
            body = ApiError(500, f"internal error: {type(error).__name__}: {error}").body()
            await JSONResponse(body, status_code=500)(scope, receive, send_and_note)
        known = route if route in KNOWN_ROUTES else "other"
        self.service.requests.labels(known, str(status[0])).inc()
        self.service.latency.labels(known).observe(time.perf_counter() - start)


def create_app(service: Service):
    """The FastAPI application of one Service."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def lifespan(app):
        service.batcher.start()
        if service.latency_candidates:  # /health answers meanwhile; requests wait for the compute thread
            choice = asyncio.get_running_loop().run_in_executor(service.compute, service.choose_fastest_backend)
            choice.add_done_callback(lambda f: not f.cancelled() and f.exception() and print(
                f"the backend choice failed ({f.exception()}); serving with {service.retriever.backend}", file=sys.stderr))
        yield
        await service.batcher.stop()
        service.compute.shutdown(wait=False)
        service.feedback.close()

    app = FastAPI(title="codex-forge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    async def json_body(request: Request) -> dict:
        """The request's JSON object: refused (415) unless sent as application/json (what a web page cannot send to
        another site without asking), and (413) past the size limit before more of it is read."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the body is sent as {kind or 'no content type'!r}: send it as JSON with the header "
                           "'Content-Type: application/json'")
        limit = service.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {declared} bytes; at most {limit}: send fewer texts")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(service.request_seconds):  # a body that drips in holds no worker for ever
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"the request body has more than {limit} bytes: send fewer texts")
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {service.request_seconds:g} s: send it at "
                           "once") from None
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON ({error}): send a JSON object") from None
        except RecursionError:
            raise ApiError(400, "the body nests JSON too deeply: send a flat JSON object") from None
        except ValueError as error:  # a number with more digits than Python converts
            raise ApiError(400, f"the body holds a number that cannot be read ({error})") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the body must be a JSON object")
        unencodable = next((k for k, v in payload.items() if not utf8_encodable(v)), None)
        if unencodable is not None:
            raise ApiError(400, f"field {unencodable!r} holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair), "
                           "which is not text: send valid Unicode", unencodable)
        return payload

    app.add_middleware(Guard, service=service)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(404)
    async def not_found(request: Request, error):
        return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}: see python -m lib.serve --help").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, error):
        return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(), status_code=405)

    @app.get("/health")
    async def health():
        return {"status": "ok", "run": service.run, "items": len(service.retriever.items)}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "codex-forge"} for m in service.models]}

    @app.get("/v1/index")
    async def index():
        return service.index_info()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return JSONResponse(await service.embeddings(await json_body(request)))  # a Response skips FastAPI's encoder

    @app.post("/v1/search")
    async def search(request: Request):
        return JSONResponse(await service.search(await json_body(request)))

    @app.post("/v1/rerank")
    async def rerank(request: Request):
        return JSONResponse(await service.rerank(await json_body(request)))

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        return JSONResponse(service.add_feedback(await json_body(request), request.client.host if request.client else "",
                                                 trusted=getattr(request.state, "trusted", False)))

    return app
KNOWN_ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/index", "/v1/embeddings", "/v1/search", "/v1/rerank",
                "/v1/feedback")

def host_name(header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header
