"""`mistral-jax serve` on a loopback port with the embedded SmolLM2, shared by a module's tests."""

import contextlib
import os
import subprocess
import sys

import openai

from tests.processes import free_port, kill_all, wait_until_serving

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


@contextlib.contextmanager
def running_server(*flags: str):
    """`start_server(*flags)` for the block's duration: killed (and reaped) at its end if still running."""
    process, url = start_server(*flags)
    try:
        yield process, url
    finally:
        kill_all([process])


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
