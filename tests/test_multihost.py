"""Two local processes of 4 CPU devices each, joined by jax.distributed, generate what one process of 8 does."""

import json
import os
import pathlib
import subprocess
import sys

import jax
from processes import free_port, kill_all

import mistral_jax as mj
from mistral_jax.sharding import make_mesh, parse_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
PRESET, MESH = "tiny-mixtral", "data=1,fsdp=2,expert=2,tensor=2"
TIMEOUT_S = 120  # a hung collective fails the test instead of blocking the run


def test_two_processes_generate_the_same_tokens_as_one(tmp_path):
    out_path, port = tmp_path / "tokens.json", free_port()
    procs = []
    for process_id in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "MISTRAL_JAX_COORDINATOR": f"127.0.0.1:{port}",
            "MISTRAL_JAX_NUM_PROCESSES": "2",
            "MISTRAL_JAX_PROCESS_ID": str(process_id),
        }
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), PRESET, MESH, str(out_path)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    try:
        # The single-process reference on this process's 8 devices, while the workers start.
        config = mj.ModelConfig.from_preset(PRESET)
        mesh = make_mesh(**parse_mesh(MESH))
        params = mj.shard_params(config, mj.init_params(config, jax.random.key(0)), mesh)
        expected = mj.generate(config, params, [[1, 2, 3, 4, 5], [7, 8]], 10, mesh=mesh)
        logs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    finally:
        kill_all(procs)
    for process_id, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {process_id} exited with {proc.returncode}:\n{log[-4000:]}"
    result = json.loads(out_path.read_text())
    assert result["generate"] == expected
    assert result["stream"] == expected


def test_cli_on_two_processes_prints_once_and_matches_one_process(tmp_path):
    """`mistral-jax generate --mesh ... --coordinator ...` on 2 processes: each loads its own shards of a
    real checkpoint, only process 0 prints, and the ids equal a one-process run on 8 devices."""
    checkpoint = ROOT / "tests" / "fixtures" / "hf" / "mixtral_top2"
    port = free_port()
    procs = []
    for process_id in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        argv = ["generate", "--checkpoint", str(checkpoint), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "8",
                "--mesh", MESH, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(process_id)]
        procs.append(subprocess.Popen([sys.executable, "-m", "mistral_jax.cli", *argv], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        mesh = make_mesh(**parse_mesh(MESH))
        config, params = mj.load(checkpoint, mesh=mesh)
        expected = mj.generate(config, params, [[5, 6, 7, 8]], 8, eos_id=config.eos_id, mesh=mesh)
        outputs = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
    finally:
        kill_all(procs)
    for process_id, (proc, (_, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {process_id} exited with {proc.returncode}:\n{err[-4000:]}"
    assert outputs[0][0].strip().splitlines()[-1] == ",".join(map(str, expected[0]))
    quiet = outputs[1][0] + outputs[1][1]  # gloo's own C++ logging may still appear: nothing of ours may
    assert "tok/s" not in quiet and ",".join(map(str, expected[0])) not in quiet
