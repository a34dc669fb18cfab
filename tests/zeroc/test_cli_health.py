"""`zeroc health`, the probe of the containers' health checks: against a real decode service, a closed port,
and real HTTP servers answering /health as the gateway does."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cli_runs import zeroc, zeroc_here
from stacks import colocated

from zeroc.config import BUNDLED_MODEL


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_is_zero_for_a_serving_decode_service_and_one_for_a_closed_port(capsys):
    for address in colocated(str(BUNDLED_MODEL)):
        run = zeroc("health", address)
        assert (run.returncode, run.stdout.strip()) == (0, "healthy"), run.stderr
        named = zeroc_here(capsys, "health", "--service", "zeroc.v1.GenerationService", address)
        assert named.returncode == 0, named.stderr
        unknown = zeroc_here(capsys, "health", "--timeout-s", "0.5", "--service", "no.such.Service", address)
        assert unknown.returncode == 1
    gone = zeroc_here(capsys, "health", "--timeout-s", "0.5", f"127.0.0.1:{closed_port()}")
    assert gone.returncode == 1 and gone.stderr.startswith("unhealthy: ")


@pytest.mark.parametrize("status", [200, 503])
def test_health_http_follows_the_gateways_health_status(capsys, status):
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        run = zeroc_here(capsys, "health", "--http", f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == (0 if status == 200 else 1), run.stderr
    if status != 200:
        assert "503" in run.stderr


def test_health_probe_does_not_import_torch():
    """Health checks run it every few seconds in every container: it must stay light."""
    probe = ("import sys; from zeroc.cli import main; "
             f"code = main(['health', '--timeout-s', '0.2', '127.0.0.1:{closed_port()}']); "
             "print(code, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["1", "False"], run.stderr


def test_health_rejects_a_non_positive_timeout(capsys):
    run = zeroc_here(capsys, "health", "--timeout-s", "0", "127.0.0.1:1")
    assert run.returncode == 2 and "--timeout-s" in run.stderr
