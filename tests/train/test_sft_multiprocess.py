"""`mistral-jax sft` and `mistral-jax dpo` on 2 local processes x 4 CPU devices (gloo) train as 1 process x 8 devices
on the same mesh, and a run resumes across process counts (2 -> 1 and 1 -> 2) with the losses of an uninterrupted
one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from processes import free_port, kill_all

from train import dpo, sft

REPO = Path(__file__).resolve().parents[2]
MESH = "data=2,fsdp=2,tensor=2"
TIMEOUT_S = 240  # a hung collective fails the test instead of blocking the run
MAINS = {"sft": sft.main, "dpo": dpo.main}
COMPARED = ("loss", "eval_loss", "rewards/margins", "rewards/accuracies", "eval_rewards/margins")  # those logged


def _flags(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
            "--seq-len", "48", "--steps", "4", "--save-every", "2", "--eval-every", "2", "--log-every", "1",
            "--eval-fraction", "0.2", "--learning-rate", "3e-3", "--mesh", MESH, *extra]


def _launch(program: str, flags: list[str]) -> list[subprocess.Popen]:
    """`mistral-jax PROGRAM FLAGS --coordinator ...` as 2 processes of 4 CPU devices, sharing the compilation
    cache."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    return [subprocess.Popen([sys.executable, "-m", "mistral_jax.cli", program, *flags, "--coordinator",
                              f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's stdout + stderr, once all exited 0 (killed if they hang)."""
    try:
        outputs = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
    finally:
        kill_all(procs)
    for i, (proc, (_, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n{err[-4000:]}"
    return [out + err for out, err in outputs]


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("program", ["sft", "dpo"])
def test_two_processes_train_as_one_and_resume_across_process_counts(tmp_path, llama_dir, data_file, prefs_file,
                                                                     program) -> None:
    reference, two_then_one, one_then_two = tmp_path / "reference", tmp_path / "2-then-1", tmp_path / "1-then-2"
    data, main = (data_file if program == "sft" else prefs_file), MAINS[program]
    procs = _launch(program, _flags(llama_dir, data, two_then_one, "--stop-at", "2"))
    try:  # while the two processes run steps 1-2: the 1-process runs on this process's 8 devices
        assert main(_flags(llama_dir, data, reference)) == 0
        assert main(_flags(llama_dir, data, one_then_two, "--stop-at", "2")) == 0
    except BaseException:
        kill_all(procs)
        raise
    first = _wait(procs)
    assert main(_flags(llama_dir, data, two_then_one, "--resume")) == 0  # 2 processes -> 1
    second = _wait(_launch(program, _flags(llama_dir, data, one_then_two, "--resume")))  # 1 process -> 2

    expected = _metrics(reference)
    assert [m["step"] for m in expected] == [1, 2, 3, 4] and expected[-1]["loss"] < expected[0]["loss"]
    for run in (two_then_one, one_then_two):  # steps 1-2 of the first, 3-4 of the second ran on 2 processes
        got = _metrics(run)
        assert [m["step"] for m in got] == [1, 2, 3, 4]
        for a, b in zip(got, expected):
            assert a["target_tokens"] == b["target_tokens"] and [k for k in COMPARED if k in a] == [
                k for k in COMPARED if k in b]
            np.testing.assert_allclose([a[k] for k in COMPARED if k in a], [b[k] for k in COMPARED if k in b],
                                       atol=1e-5)
        _, params = sft.latest_params(run)
        _, reference_params = sft.latest_params(reference)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), params, reference_params)
    for logs in (first, second):  # only process 0 prints
        assert "data: " in logs[0] and "checkpoints in" in logs[0]
        assert "data: " not in logs[1] and "checkpoints in" not in logs[1] and "resuming" not in logs[1]
    assert "resuming from step 2" in second[0]
