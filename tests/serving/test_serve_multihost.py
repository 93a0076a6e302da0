"""`mistral-jax serve` on 2 local processes x 4 CPU devices (gloo): process 0 answers, both step in lockstep,
and the tokens equal one process on the same 8-device mesh, with the slots or the paged cache (process 0's page
tables and adapter loads travel in the broadcast plan), on the base and on LoRA adapters (`--lora-modules`, expert
weights included; one start of the pair checks the base and the adapters); SIGTERM to process 0 stops both,
exit 0."""

import concurrent.futures
import contextlib
import os
import pathlib
import signal
import subprocess
import sys

import httpx
import pytest

import mistral_jax as mj
from mistral_jax.checkpoints import peft
from mistral_jax.sharding import make_mesh, parse_mesh
from tests.processes import free_port, kill_all, wait_until_serving
from tests.serving.test_lora_engine import random_adapter

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "tests" / "fixtures" / "hf" / "mixtral_top2"  # no tokenizer: token-id completions
MESH = "data=2,fsdp=1,expert=2,tensor=2"
pytestmark = pytest.mark.slow

PAGED = ["--page-size", "16", "--max-total-tokens", "512", "--max-num-batched-tokens", "16"]  # few programs
PROMPTS = [[5, 6, 7, 8], [9] * 20, [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40] * 30]
LENGTHS = [8, 3, 12, 5, 9, 6]


@contextlib.contextmanager
def two_processes(*flags):
    """`serve` of CHECKPOINT on 2 processes x 4 devices (MESH) with `flags`: yields (port, processes) at once (wait
    with wait_until_serving); at the end SIGTERM to process 0 stops both, each exiting 0."""
    http_port, coordinator = free_port(), free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mistral_jax.cli", "serve", "--checkpoint", str(CHECKPOINT), "--mesh", MESH,
         "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2", "--process-id", str(i),
         "--port", str(http_port), "--max-batch", "4", "--max-seq-len", "64", "--prefill-chunk", "16", *flags],
        env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        yield http_port, procs
        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        kill_all(procs)
    assert codes == [0, 0]


def completions(port: int, models) -> list[list[int]]:
    """Greedy token ids for PROMPTS, asked at once, prompt i on model models[i] (None: the base)."""

    def ask(i):
        body = {"prompt": PROMPTS[i], "max_tokens": LENGTHS[i], "temperature": 0, "logprobs": 0, "ignore_eos": True,
                "return_tokens_as_token_ids": True, **({"model": models[i]} if models[i] else {})}
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120).json()
        return [int(t.removeprefix("token_id:")) for t in out["choices"][0]["logprobs"]["tokens"]]

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(ask, range(len(PROMPTS))))


@pytest.mark.parametrize("flags", [[], PAGED], ids=["slots", "paged"])
def test_two_processes_serve_the_base_and_lora_adapters_as_one_process_generates(flags, tmp_path):
    """One start of the pair per cache layout: every prompt on the base, then the prompts spread over two adapters
    and the base at once; each equals mj.generate on one process over the same mesh."""
    config, params = mj.load(CHECKPOINT)
    targets = {"experts": (4, ("wq", "w_gate", "w_up", "w_down")), "attention": (2, ("wk", "wv", "wo"))}
    strong = lambda seed, rank, ts: random_adapter(config, params, seed, rank, ts).replace(scale=10.0)  # noqa: E731
    paths = {name: str(peft.write(config, strong(seed, rank, ts), tmp_path / name, base_model=str(CHECKPOINT)))
             for seed, (name, (rank, ts)) in enumerate(targets.items())}  # (scale 10: each changes the tokens)
    models = ["experts", None, "attention", "experts", "attention", None]
    with two_processes(*flags, "--max-loras", "4", "--max-lora-rank", "4", "--lora-modules",
                       *(f"{name}={path}" for name, path in paths.items())) as (port, procs):
        mesh = make_mesh(**parse_mesh(MESH))
        config, params = mj.load(CHECKPOINT, mesh=mesh, scan_layers=False)
        expected = [mj.generate(config, params, [p], n, mesh=mesh, adapter=paths.get(m))[0]
                    for p, n, m in zip(PROMPTS, LENGTHS, models)]
        base = [mj.generate(config, params, [p], n, mesh=mesh)[0] for p, n in zip(PROMPTS, LENGTHS)]
        assert all(e != b for e, b, m in zip(expected, base, models) if m)  # each adapter changes its tokens
        wait_until_serving(procs[0])
        assert completions(port, [None] * len(PROMPTS)) == base
        assert completions(port, models) == expected
