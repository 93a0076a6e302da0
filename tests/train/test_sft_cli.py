"""train.sft end to end on a tiny model: exact resume, unfinished checkpoints ignored, SIGTERM, LoRA export, errors."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sft_helpers import chats, write_jsonl

import mistral_jax as mj
from mistral_jax import cli
from mistral_jax.checkpoints import orbax, run_dir
from mistral_jax.checkpoints.run_dir import checkpoint_manager
from mistral_jax.compile_stats import CompileStats
from train import settings, sft

REPO = Path(__file__).resolve().parents[2]


def _flags(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(model), "--data", str(data), "--output", str(output), "--batch-size", "2",
            "--seq-len", "64", "--learning-rate", "3e-3", "--log-every", "1", "--eval-fraction", "0.2", *extra]


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


COMMON = ("--steps", "20", "--save-every", "5", "--eval-every", "10")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, llama_dir, data_file) -> Path:
    """A 20-step run in one go, the reference for the resumed ones."""
    output = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert sft.main(_flags(llama_dir, data_file, output, *COMMON)) == 0
    return output


def _assert_same_run(a: Path, b: Path, atol: float, params_atol: float) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in mb] == list(range(1, 21)) and ma[0]["loss"] > 4 * ma[-1]["loss"]
    for x, y in zip(ma, mb):
        assert abs(x["loss"] - y["loss"]) <= atol and x.get("eval_loss") == pytest.approx(y.get("eval_loss"), abs=atol)
    _, params_a = sft.latest_params(a)
    _, params_b = sft.latest_params(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=params_atol), params_a, params_b)


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, uninterrupted, llama_dir, data_file) -> None:
    assert sft.main(_flags(llama_dir, data_file, tmp_path / "b", *COMMON, "--stop-at", "10")) == 0
    checkpoints = tmp_path / "b" / "checkpoints"
    assert checkpoint_manager(tmp_path / "b", read_only=True).all_steps() == [5, 10]
    # A save cut off mid-write: orbax's temporary directory, never renamed into place.
    unfinished = checkpoints / "15.orbax-checkpoint-tmp-1700000000000"
    (unfinished / "trainable").mkdir(parents=True)
    (unfinished / "trainable" / "partial").write_bytes(b"\0" * 64)
    assert sft.main(_flags(llama_dir, data_file, tmp_path / "b", *COMMON)) == 2  # no silent restart over a run
    assert sft.main(_flags(llama_dir, data_file, tmp_path / "b", *COMMON, "--resume")) == 0
    _assert_same_run(uninterrupted, tmp_path / "b", atol=1e-6, params_atol=1e-6)
    last = _metrics(uninterrupted)[-1]
    assert {"learning_rate", "grad_norm", "tokens_per_second", "eval_loss"} <= set(last)
    config, _ = sft.latest_params(uninterrupted)
    assert config.dtype == "float32" and config.vocab_size == 256
    assert checkpoint_manager(tmp_path / "b", read_only=True).all_steps() == [10, 15, 20]  # the last 3 kept


def test_sharded_run_resumes_and_matches(tmp_path, uninterrupted, llama_dir, data_file) -> None:
    """8 devices (data=2, fsdp=2, tensor=2): sharded checkpoints restore onto the mesh, results match one device."""
    flags = (*COMMON, "--mesh", "data=2,fsdp=2,tensor=2")
    assert sft.main(_flags(llama_dir, data_file, tmp_path / "c", *flags, "--stop-at", "10")) == 0
    assert sft.main(_flags(llama_dir, data_file, tmp_path / "c", *flags, "--resume")) == 0
    # Adam divides by sqrt(v): float-rounding differences of tiny gradients move a few weights by ~lr / 10.
    _assert_same_run(uninterrupted, tmp_path / "c", atol=1e-4, params_atol=3e-3)


def test_lora_run_exports_merged_params(tmp_path, lora_run, llama_dir, capsys) -> None:
    output = lora_run  # conftest.py: 4 steps, rank 4 on wq, wv, w_down, bfloat16 compute, remat
    info = json.loads((output / "run.json").read_text())
    assert info["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["wq", "wv", "w_down"]}
    assert info["model_config"]["dtype"] == "bfloat16" and info["model_config"]["param_dtype"] == "float32"
    assert info["settings"]["compute_dtype"] == "bfloat16" and info["checkpoint"] == str(llama_dir)
    config, merged = sft.latest_params(output)
    base = orbax.restore(llama_dir, orbax.abstract_params(config))
    assert config.dtype == "float32" and not config.remat
    for name in ("wq", "wv"):
        assert not np.allclose(merged["layers"]["attention"][name], base["layers"]["attention"][name])
    assert not np.allclose(merged["layers"]["mlp"]["w_down"], base["layers"]["mlp"]["w_down"])
    np.testing.assert_array_equal(merged["layers"]["attention"]["wk"], base["layers"]["attention"]["wk"])
    np.testing.assert_array_equal(merged["embedding"], base["embedding"])

    # mj.load(RUN): the same latest step, LoRA merged, in the dtype and layout asked for; the run's tokenizer.
    _, loaded = mj.load(output)
    jax.tree.map(np.testing.assert_array_equal, loaded, merged)
    config16, unscanned = mj.load(output, "bfloat16", scan_layers=False)
    assert config16.dtype == config16.param_dtype == "bfloat16" and not config16.scan_layers
    assert unscanned["layers"]["0"]["attention"]["wq"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(unscanned["layers"]["0"]["attention"]["wq"],
                                  merged["layers"]["attention"]["wq"][0].astype(jnp.bfloat16))
    assert run_dir.tokenizer_source(output) == str(llama_dir)

    # `mistral-jax export RUN DST`: an HF directory of the merged weights, with the base's tokenizer.
    assert cli.main(["export", str(output), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    _, exported = mj.load(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, exported, merged)

    # `mistral-jax generate --checkpoint RUN`: the same latest step, LoRA merged, with the run's tokenizer.
    def generate(checkpoint, *flags):
        assert cli.main(["generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "8", *flags]) == 0
        return capsys.readouterr().out  # the generated ids, or the streamed text

    capsys.readouterr()
    ids = ["--prompt-ids", "5,6,7,8"]
    exported_ids = generate(tmp_path / "hf", *ids)
    assert generate(output, *ids) == exported_ids
    text = ["--prompt", "Who runs the Orbit Cafe?"]
    assert generate(output, *text) == generate(tmp_path / "hf", *text)
    # On a mesh (8 devices): base and adapters restored sharded, merged shard by shard.
    assert generate(output, *ids, "--mesh", "fsdp=4,tensor=2") == exported_ids


def test_sigkill_inside_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, uninterrupted, llama_dir,
                                                                           data_file) -> None:
    """SIGKILL while step 10's checkpoint is being committed: it is never listed, --resume continues from step 5
    and the run ends as the uninterrupted one (the metrics logged after step 5 by the killed run dropped)."""
    output, marker = tmp_path / "killed", tmp_path / "in-save"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    command = [sys.executable, str(REPO / "tests" / "train" / "slow_save_worker.py"), "10", str(marker),
               *_flags(llama_dir, data_file, output, *COMMON)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.is_file():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.kill()  # SIGKILL: no handler runs
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert Path(marker.read_text()).is_dir()  # step 10's complete-but-uncommitted files are still there
    assert checkpoint_manager(output, read_only=True).all_steps() == [5]
    assert sft.main(_flags(llama_dir, data_file, output, *COMMON, "--resume")) == 0
    _assert_same_run(uninterrupted, output, atol=1e-6, params_atol=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, llama_dir, data_file) -> None:
    output = tmp_path / "preempted"
    command = [sys.executable, "-m", "train.sft",
               *_flags(llama_dir, data_file, output, "--steps", "100000", "--save-every", "100000",
                       "--eval-fraction", "0")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not ((output / "metrics.jsonl").is_file() and len(_metrics(output)) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    steps = checkpoint_manager(output, read_only=True).all_steps()
    assert len(steps) == 1 and steps[0] >= 3 and f"preempted at step {steps[0]}" in stderr
    assert _metrics(output)[-1]["step"] == steps[0]


def test_bad_jsonl_line_is_reported(tmp_path, llama_dir, capsys) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [*chats(2), '{"messages": [{"role": "user", "content": "hi"}]}'])
    assert sft.main(_flags(llama_dir, data, tmp_path / "out", "--steps", "2")) == 2
    assert "bad.jsonl:3: no assistant message" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # inputs are checked before anything is written


@pytest.mark.parametrize("problem", ["missing checkpoint", "seq-len too long", "warmup too long"])
def test_input_errors_leave_no_output_behind(tmp_path, llama_dir, data_file, capsys, problem) -> None:
    model, extra = llama_dir, ["--steps", "2"]
    if problem == "missing checkpoint":
        model = tmp_path / "no-such-model"
    elif problem == "seq-len too long":
        extra += ["--seq-len", "100000"]
    else:
        extra += ["--warmup-steps", "5"]
    assert sft.main([*_flags(model, data_file, tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mistral-jax sft: error: ")
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_directory_that_is_not_a_run(tmp_path, llama_dir, data_file, capsys) -> None:
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    assert sft.main(_flags(llama_dir, data_file, output, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(output) in err and "not an sft run directory" in err
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]  # nothing written: no run.json, metrics
    assert (output / "notes.txt").read_text() == "keep me"


def test_output_under_a_file_or_unwritable_is_one_line_before_any_compilation(tmp_path, llama_dir, data_file,
                                                                              capsys) -> None:
    (tmp_path / "file").write_text("not a directory")
    for output, message in ((tmp_path / "file" / "x", "is a file, not a directory"),
                            (Path("/sys/mistral-jax-run"), "/sys/mistral-jax-run: cannot write in /sys")):  # root too
        with CompileStats() as compiled:
            assert sft.main(_flags(llama_dir, data_file, output, "--steps", "2")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
        assert compiled.lowerings == 0


def test_run_config_file_with_flag_overrides(tmp_path) -> None:
    parser = sft.add_sft_flags(argparse.ArgumentParser())  # the settings' flags and the distributed ones
    demo = REPO / "configs" / "sft" / "smollm2-demo.json"
    s = settings.resolve(parser.parse_args(["--config", str(demo), "--steps", "3", "--output", str(tmp_path)]))
    assert s.steps == 3 and s.output == tmp_path and Path(s.data).is_file() and s.checkpoint is None
    assert s.warmup_steps == 2 and s.learning_rate == 1e-4 and s.eval_every == 3
    s = settings.resolve(parser.parse_args(["--data", "x.jsonl", "--output", "o", "--steps", "100",
                                            "--lora-rank", "8"]))
    assert (s.warmup_steps, s.learning_rate, s.lora_alpha, s.save_every, s.eval_every) == (
        5, settings.LORA_LR, 16.0, 10, 10)
    with pytest.raises(ValueError, match="missing --data, --output"):
        settings.resolve(parser.parse_args(["--steps", "3"]))
    (tmp_path / "typo.json").write_text('{"step": 3}')
    with pytest.raises(ValueError, match=r"unknown settings \['step'\]"):
        settings.resolve(parser.parse_args(["--config", str(tmp_path / "typo.json")]))
