"""The API benchmark's load generator (bench/loadgen.py) measures its own CPU, so that
bench.api_load can refuse a ratio for a row the generator paced: the Python generator against a
local server, and the rule that calls a run generator-bound."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench import loadgen
from bench.loadgen import GENERATOR_BOUND, LoadResult, run_load


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()


def test_the_python_generator_reports_its_cpu(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen.shutil, "which", lambda _name: None)  # as on a machine without wrk
    res = run_load(server, {}, connections=4, seconds=1.0)
    assert res.client == "python-httpx" and res.client_threads == 1
    assert res.requests > 0 and res.errors == 0
    # CPU time of the generator process over its wall time: busy, at most its one thread
    assert 0.05 < res.client_cpu <= 1.2, res


def test_a_run_is_generator_bound_when_its_threads_were_busy() -> None:
    def result(cpu: float, threads: int) -> LoadResult:
        return LoadResult(100, 1.0, 0, 1.0, 2.0, 3.0, "wrk", client_cpu=cpu, client_threads=threads)

    assert result(GENERATOR_BOUND * 1.01, 1).generator_bound
    assert not result(0.3, 1).generator_bound
    assert not result(1.0, 2).generator_bound  # half of two threads
    assert result(1.9, 2).generator_bound
