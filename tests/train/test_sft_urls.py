"""gs:// through a real GCS server: fake-gcs-server on a loopback port (the gcs_bucket fixture, tests/conftest.py).
convert, sft and dpo (and --resume), generate, chat, plot and export read and write gs:// URLs there; metrics.jsonl
on a URL is rewritten at flushes, not at every line, and TensorBoard's event files are uploaded at flushes."""

import io
import json
import os

import jax
import numpy as np

import mistral_jax as mj
from mistral_jax import cli
from mistral_jax.checkpoints import run_dir
from mistral_jax.paths import as_path
from train import sft


def _steps(url: str) -> list[int]:
    return [json.loads(line)["step"] for line in as_path(url).read_text().splitlines()]


def test_metrics_log_on_a_url_is_rewritten_at_flushes_not_at_every_line(gcs_bucket, tmp_path) -> None:
    url = f"{gcs_bucket}/metrics-log/metrics.jsonl"
    log = run_dir.MetricsLog(url)
    assert not log.append
    log.write({"step": 1})
    log.write({"step": 2})
    assert not as_path(url).exists()  # nothing written per line
    log.flush()
    assert _steps(url) == [1, 2]
    log.write({"step": 3})
    log.close()
    assert _steps(url) == [1, 2, 3]
    as_path(url).write_text(as_path(url).read_text() + '{"ste')  # a line cut off by a killed run
    resumed = run_dir.MetricsLog(url, resume_step=2)  # what came after the checkpoint is dropped at once
    assert _steps(url) == [1, 2]
    resumed.write({"step": 3, "loss": 0.5})
    resumed.close()
    assert [json.loads(line) for line in as_path(url).read_text().splitlines()][2] == {"step": 3, "loss": 0.5}

    file = tmp_path / "metrics.jsonl"  # locally: appended, each line on disk at once
    file.write_text('{"step": 1}\n')
    local = run_dir.MetricsLog(file)
    local.write({"step": 2})
    assert local.append and file.read_text() == '{"step": 1}\n{"step": 2}\n'
    local.close()


def test_convert_sft_resume_generate_chat_export_on_gs(gcs_bucket, llama_dir, data_file, tmp_path, capsys,
                                                       monkeypatch) -> None:
    base, run = f"{gcs_bucket}/models/base", f"{gcs_bucket}/runs/sft-1"
    assert cli.main(["convert", str(llama_dir), base]) == 0  # orbax arrays through tensorstore, files through gcsfs
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == os.environ["STORAGE_EMULATOR_HOST"]  # derived by the package
    flags = ["sft", "--checkpoint", base, "--output", run, "--data", str(data_file), "--steps", "3",
             "--save-every", "2", "--batch-size", "2", "--seq-len", "64", "--log-every", "1", "--eval-fraction", "0",
             "--learning-rate", "0.005"]  # enough to change what the model says (chat below shows whose weights)
    assert cli.main([*flags, "--stop-at", "2"]) == 0
    assert cli.main([*flags, "--resume"]) == 0
    assert "resuming from step 2" in capsys.readouterr().err
    assert _steps(f"{run}/metrics.jsonl") == [1, 2, 3]
    assert run_dir.checkpoint_manager(run, read_only=True).all_steps() == [2, 3]
    info = run_dir.run_info(run)
    assert info["checkpoint"] == base and info["tokenizer"] == base and info["settings"]["output"] == run

    assert cli.main(["export", run, str(tmp_path / "hf")]) == 0
    _, trained = sft.latest_params(run)
    _, exported = mj.load(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, exported, trained)
    _, base_params = mj.load(base)
    assert not np.allclose(trained["embedding"], base_params["embedding"])  # the run's weights, not the base's

    capsys.readouterr()
    answers, ids = [], ["--prompt-ids", "5,6,7,8", "--max-new-tokens", "6"]
    for checkpoint in (run, str(tmp_path / "hf")):
        assert cli.main(["generate", "--checkpoint", checkpoint, *ids]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()
    chats = []
    for checkpoint in (run, str(tmp_path / "hf"), base):
        monkeypatch.setattr("sys.stdin", io.StringIO("Who runs the Orbit Cafe?\nAnd who else?\n"))
        assert cli.main(["chat", "--checkpoint", checkpoint, "--max-new-tokens", "6"]) == 0
        chats.append(capsys.readouterr().out)
    # the run on gs:// chats as its local export does (whitespace, after 3 steps at 0.005), not as its base
    assert chats[0] == chats[1] != chats[2] and chats[2].strip()


def test_dpo_on_gs_resumes_and_uploads_its_tensorboard_events(gcs_bucket, llama_dir, prefs_file, tmp_path,
                                                              capsys) -> None:
    run = f"{gcs_bucket}/runs/dpo-1"
    flags = ["dpo", "--checkpoint", str(llama_dir), "--output", run, "--data", str(prefs_file), "--steps", "3",
             "--save-every", "2", "--batch-size", "2", "--seq-len", "40", "--log-every", "1", "--eval-fraction", "0",
             "--lora-rank", "2"]
    assert cli.main([*flags, "--stop-at", "2"]) == 0
    events = list((as_path(run) / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents.")
    assert cli.main([*flags, "--resume"]) == 0
    assert "resuming from step 2" in capsys.readouterr().err
    assert _steps(f"{run}/metrics.jsonl") == [1, 2, 3]
    assert len(list((as_path(run) / "tensorboard").iterdir())) == 2  # the resumed run's own event file
    assert run_dir.run_info(run)["program"] == "dpo"
    assert cli.main(["plot", run]) == 0
    assert (as_path(run) / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["export", run, str(tmp_path / "hf")]) == 0
    _, exported = mj.load(tmp_path / "hf")
    _, trained = sft.latest_params(run)
    jax.tree.map(np.testing.assert_array_equal, exported, trained)
