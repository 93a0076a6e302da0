"""`mistral-jax serve` on 2 local processes x 4 CPU devices (gloo): process 0 answers, both step in lockstep,
and the tokens equal one process on the same 8-device mesh, with the slots or the paged cache (process 0's page
tables travel in the broadcast plan); SIGTERM to process 0 stops both, exit 0."""

import concurrent.futures
import os
import pathlib
import signal
import socket
import subprocess
import sys

import httpx
import pytest

import mistral_jax as mj
from mistral_jax.sharding import make_mesh, parse_mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "tests" / "fixtures" / "hf" / "mixtral_top2"  # no tokenizer: token-id completions
MESH = "data=2,fsdp=1,expert=2,tensor=2"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PAGED = ["--page-size", "16", "--max-total-tokens", "512", "--max-num-batched-tokens", "16"]  # few programs


@pytest.mark.parametrize("flags", [[], PAGED], ids=["slots", "paged"])
def test_two_processes_serve_what_one_process_generates(flags):
    http_port, coordinator = _free_port(), _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mistral_jax.cli", "serve", "--checkpoint", str(CHECKPOINT), "--mesh", MESH,
         "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2", "--process-id", str(i),
         "--port", str(http_port), "--max-batch", "4", "--max-seq-len", "64", "--prefill-chunk", "16", *flags],
        env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        mesh = make_mesh(**parse_mesh(MESH))
        config, params = mj.load(CHECKPOINT, mesh=mesh, scan_layers=False)
        prompts = [[5, 6, 7, 8], [9] * 20, [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40] * 30]
        lengths = [8, 3, 12, 5, 9, 6]
        expected = [mj.generate(config, params, [p], n, mesh=mesh)[0] for p, n in zip(prompts, lengths)]
        for line in procs[0].stderr:
            if " on http://" in line:
                break
        else:
            pytest.fail("process 0 did not start serving")

        def ask(i):
            body = {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "logprobs": 0,
                    "ignore_eos": True, "return_tokens_as_token_ids": True}
            out = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=120).json()
            return [int(t.removeprefix("token_id:")) for t in out["choices"][0]["logprobs"]["tokens"]]

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(ask, range(len(prompts)))) == expected
        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0]

