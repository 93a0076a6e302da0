"""gs:// paths through sft, generate and the metrics log, without a bucket: etils.epath is pointed at the local
disk (a gs://bucket/x URL becomes ./gs:/bucket/x) and the orbax calls that would reach GCS are recorded instead."""

import importlib
import json
import shutil

import pytest
from etils import epath
from etils.epath import testing as epath_testing

import mistral_jax as mj
from mistral_jax import cli
from mistral_jax.checkpoints import orbax, run_dir
from mistral_jax.paths import is_url

load_module = importlib.import_module("mistral_jax.checkpoints.load")  # the package rebinds .load to the function


class Reached(Exception):
    """Raised by a stand-in once the call under test got where it was going (not caught by the CLIs)."""


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://bucket/... is tmp_path/gs:/bucket/... for etils.epath; opening a gs:// file for appending fails, as on GCS.
    Yields the list of (path, mode) of every gs:// open."""
    opened = []

    def open_(original, path, mode):
        if is_url(path):
            opened.append((str(path), mode))
            if "a" in mode:
                raise OSError(f"{path}: objects on gs:// cannot be appended to")
        return original(path, mode)

    monkeypatch.chdir(tmp_path)
    with epath_testing.mock_epath(open=open_):
        yield opened


def local(url: str):
    """Where the mocked epath keeps a gs:// URL."""
    return epath.Path("gs:") / url.removeprefix("gs://")


class FakeManager:
    """orbax.checkpoint.CheckpointManager as the loop uses it, recording where and what it saves."""

    made: list["FakeManager"] = []

    def __init__(self, directory, options=None, item_names=None):
        self.directory, self.steps = directory, []
        FakeManager.made.append(self)
        epath.Path(directory).mkdir(parents=True, exist_ok=True)  # as orbax's create=True (a no-op on real GCS)

    def latest_step(self):
        return self.steps[-1] if self.steps else None

    def save(self, step, force=False, args=None):
        self.steps.append(step)

    def wait_until_finished(self):
        pass

    def close(self):
        pass


def test_metrics_log_rewrites_a_url_and_appends_locally(bucket, tmp_path):
    url = "gs://bucket/run/metrics.jsonl"
    local(url).parent.mkdir(parents=True)  # GCS has no directories; the local stand-in needs this one
    steps = lambda: [json.loads(line)["step"] for line in local(url).read_text().splitlines()]  # noqa: E731
    log = run_dir.MetricsLog(url)
    assert not log.append
    log.write({"step": 1})
    assert steps() == [1]  # on storage as soon as it is written
    log.write({"step": 2})
    log.close()
    assert steps() == [1, 2]
    resumed = run_dir.MetricsLog(url)  # a resumed run keeps the earlier lines
    resumed.write({"step": 3})
    resumed.close()
    assert steps() == [1, 2, 3]
    assert {mode for _, mode in bucket} == {"r", "w"}  # never "a"

    file = tmp_path / "local" / "metrics.jsonl"
    file.parent.mkdir()
    file.write_text('{"step": 1}\n')
    log = run_dir.MetricsLog(file)
    assert log.append and str(log.path) == str(file)
    log.write({"step": 2})
    log.close()
    assert file.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_metrics_log_of_a_resumed_run_drops_later_steps(bucket, tmp_path):
    """Resuming from step S (on a URL or locally) drops what a killed run logged after S, a cut-off line too."""
    url = "gs://bucket/run/metrics.jsonl"
    local(url).parent.mkdir(parents=True)
    file = tmp_path / "local" / "metrics.jsonl"
    file.parent.mkdir()
    for where, path in ((local(url), url), (file, file)):
        where.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"ste')
        log = run_dir.MetricsLog(path, resume_step=2)
        log.write({"step": 3, "loss": 0.5})
        log.close()
        assert [json.loads(line) for line in where.read_text().splitlines()] == [
            {"step": 1}, {"step": 2}, {"step": 3, "loss": 0.5}]
    assert all("a" not in mode for _, mode in bucket)


def test_sft_with_gs_output_and_checkpoint(bucket, monkeypatch, llama_dir, data_file) -> None:
    """--output and --checkpoint URLs reach orbax as given; run.json and metrics.jsonl are written under the URL,
    and the tokenizer comes from the gs:// checkpoint."""
    base, run = "gs://bucket/models/base", "gs://bucket/runs/sft-1"
    shutil.copytree(llama_dir, local(base))  # the base model's tokenizer files are read from "gs://"
    loaded = []
    real_load = load_module.load

    def load(path, dtype, mesh):  # orbax would read gs:// arrays with tensorstore's GCS driver: the same model, locally
        loaded.append((str(path), dtype))
        return real_load(llama_dir, dtype, mesh=mesh)

    monkeypatch.setattr(load_module, "load", load)
    monkeypatch.setattr(run_dir.ocp, "CheckpointManager", FakeManager)
    FakeManager.made.clear()
    argv = ["sft", "--checkpoint", base, "--output", run, "--data", str(data_file), "--steps", "3", "--save-every", "2",
            "--batch-size", "2", "--seq-len", "64", "--log-every", "1", "--eval-fraction", "0"]
    assert cli.main(argv) == 0
    (manager,) = FakeManager.made
    assert str(manager.directory) == run + "/checkpoints" and manager.steps == [2, 3]
    assert loaded == [(base, "float32")]
    info = json.loads(local(run + "/run.json").read_text())
    assert info["checkpoint"] == base and info["tokenizer"] == base and info["settings"]["output"] == run
    metrics = [json.loads(line) for line in local(run + "/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert ("gs://bucket/runs/sft-1/metrics.jsonl", "w") in bucket and all("a" not in mode for _, mode in bucket)


def test_generate_from_gs_run_and_orbax_checkpoint(bucket, monkeypatch, capsys) -> None:
    """generate --checkpoint gs://...: an sft run directory reaches its checkpoint manager, an orbax checkpoint
    orbax's restore, both with the URL unmangled."""
    run = "gs://bucket/runs/sft-1"
    config = mj.ModelConfig.from_preset("tiny-llama")
    local(run).mkdir(parents=True)
    base = "gs://bucket/models/base"
    info = {"model_config": config.to_dict(), "checkpoint": base, "tokenizer": base, "lora": None, "settings": {}}
    local(run + "/run.json").write_text(json.dumps(info))

    def manager(directory, options=None, item_names=None):
        raise Reached(str(directory))

    monkeypatch.setattr(run_dir.ocp, "CheckpointManager", manager)
    with pytest.raises(Reached, match=f"^{run}/checkpoints$"):
        cli.main(["generate", "--checkpoint", run, "--prompt-ids", "1,2"])

    local(base).mkdir(parents=True)
    (local(base) / orbax.CONFIG_FILE).write_text(json.dumps(config.to_dict()))

    def restore(path, abstract_params):
        raise Reached(str(path))

    monkeypatch.setattr(orbax, "restore", restore)
    with pytest.raises(Reached, match=f"^{base}$"):
        cli.main(["generate", "--checkpoint", base, "--prompt-ids", "1,2"])
