"""`mistral-jax serve` on a loopback port with the embedded SmolLM2, shared by a module's tests; or an engine's
app served in this process (uvicorn in a thread), so the test can also call the engine and count compilations."""

import collections
import contextlib
import os
import subprocess
import sys
import threading
import time

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
    process.log_tail = collections.deque(maxlen=200)  # what it says later: read on, or a full pipe would block it
    threading.Thread(target=process.log_tail.extend, args=(process.stderr,), daemon=True).start()
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


@contextlib.contextmanager
def serving_in_process(engine, tokenizer):
    """The API over a started `engine` on a loopback port (uvicorn in a thread) -> its url; stopped at the end."""
    import uvicorn

    from mistral_jax.serving import api

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.create_app(engine, tokenizer, MODEL, api_key=KEY), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()
