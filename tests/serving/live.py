"""`mistral-jax serve` on a loopback port with the embedded SmolLM2, shared by a module's tests."""

import os
import subprocess
import sys

from tests.processes import free_port, wait_until_serving

MODEL = "smollm2-135m-instruct"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """(process, url) of a server started with `flags` (after --port and --api-key), once it listens."""
    port = free_port()
    command = [sys.executable, "-m", "mistral_jax.cli", "serve", "--port", str(port), "--api-key", KEY, *flags]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "XLA_FLAGS": ""})
    wait_until_serving(process)
    return process, f"http://127.0.0.1:{port}"
