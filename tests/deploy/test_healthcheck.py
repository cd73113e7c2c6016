"""`python -m services.healthcheck ADDR [SERVICE]`: the container healthcheck's exit code."""
from __future__ import annotations

import subprocess
import sys

from services.config import ServerConfig
from services.healthcheck import main
from services.server import GrpcServer
from tests.deploy import checks


def test_exit_code_follows_serving_status(capsys):
    server = GrpcServer(ServerConfig("127.0.0.1:0"), [], ["test.Svc"])
    server.start()
    try:
        assert main([server.address]) == 1  # started, not yet SERVING
        server.set_serving()
        assert main([server.address]) == 0
        assert main([server.address, "test.Svc"]) == 0
        assert main([server.address, "other.Svc"]) == 1
        assert capsys.readouterr().out.split() == ["NOT_SERVING", "SERVING", "SERVING", "NOT_FOUND"]
    finally:
        server.stop()
    assert main([server.address, "--timeout", "1"]) == 1  # nobody listening


def test_runs_as_a_module():
    """As compose.yaml's healthcheck runs it: a fresh interpreter, exit code only."""
    result = subprocess.run([sys.executable, "-m", "services.healthcheck", "127.0.0.1:1", "--timeout", "1"],
                            check=False, cwd=checks.ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout.strip() == "UNAVAILABLE"
