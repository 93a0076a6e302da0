"""`mistral-jax dpo` end to end on a tiny model: a synthetic preference task learnt (reward accuracy > 0.9 within 30
steps), TRL's metric names in metrics.jsonl and TensorBoard, `mistral-jax plot`, a LoRA run read back by export
and generate, and the SFT settings refused where they mean nothing."""

import argparse
import json
import math
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from sft_helpers import read_events

import mistral_jax as mj
from mistral_jax import cli
from train import dpo, plot, program, settings, sft
from train.objectives import PAIR_METRICS


def _flags(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
            "--seq-len", "40", "--log-every", "1", "--eval-fraction", "0.2", *extra]


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learnt(tmp_path_factory, llama_dir, prefs_file) -> Path:
    """30 steps of full-fine-tune DPO on the synthetic task (the reference: a frozen copy of the start)."""
    output = tmp_path_factory.mktemp("runs") / "dpo"
    assert dpo.main(_flags(llama_dir, prefs_file, output, "--steps", "30", "--learning-rate", "1e-3",
                           "--eval-every", "10")) == 0
    return output


def test_synthetic_preferences_are_learnt(learnt) -> None:
    metrics = _metrics(learnt)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    first = metrics[0]  # policy == reference: every reward 0, the loss log 2, no pair ranked right yet
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6) and first["rewards/accuracies"] == 0
    assert set(PAIR_METRICS) | {"learning_rate", "grad_norm", "tokens_per_second", "target_tokens"} <= set(first)
    assert np.mean([m["rewards/accuracies"] for m in metrics[-5:]]) > 0.9
    assert metrics[-1]["rewards/margins"] > 1 and metrics[-1]["loss"] < 0.3
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [10, 20, 30]
    assert {f"eval_{k}" for k in PAIR_METRICS} <= set(evals[-1])
    assert evals[-1]["eval_rewards/accuracies"] > 0.9 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    info = json.loads((learnt / "run.json").read_text())
    assert info["program"] == "dpo" and info["settings"]["beta"] == 0.1 and info["settings"]["loss"] == "sigmoid"


def test_tensorboard_holds_the_logged_scalars(learnt) -> None:
    scalars = read_events(learnt / "tensorboard")
    metrics = _metrics(learnt)
    for key, tag in (("loss", "train/loss"), ("rewards/margins", "train/rewards/margins"),
                     ("grad_norm", "train/grad_norm"), ("eval_rewards/accuracies", "eval/rewards/accuracies")):
        logged = [(m["step"], m[key]) for m in metrics if key in m]
        assert [s for s, _ in scalars[tag]] == [s for s, _ in logged], tag
        np.testing.assert_allclose([v for _, v in scalars[tag]], [v for _, v in logged], rtol=1e-6)


def test_plot_draws_loss_and_reward_curves(learnt, tmp_path, capsys) -> None:
    assert [title for title, _ in plot.curves(_metrics(learnt))] == [
        "loss", "reward margin (chosen - rejected)", "reward accuracy"]
    assert cli.main(["plot", str(learnt)]) == 0
    assert capsys.readouterr().out.strip() == str(learnt / "loss.png")
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(learnt), "--out", str(out)]) == 0
    for png in (learnt / "loss.png", out):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (700, 900)  # three panels
    assert cli.main(["plot", str(tmp_path)]) == 2  # no metrics.jsonl: one line


def test_lora_ipo_run_is_read_by_export_and_generate(tmp_path, llama_dir, prefs_file, capsys) -> None:
    output = tmp_path / "lora"
    assert cli.main(["dpo", *_flags(llama_dir, prefs_file, output, "--steps", "3", "--lora-rank", "4",
                                    "--loss", "ipo", "--beta", "0.5", "--eval-fraction", "0")]) == 0
    first = _metrics(output)[0]
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6)  # adapters start at B = 0: the base
    assert first["loss"] == pytest.approx((0 - 1 / (2 * 0.5)) ** 2, abs=1e-6)  # IPO at zero log-ratios
    config, merged = sft.latest_params(output)
    _, base = mj.load(llama_dir)
    assert not np.allclose(merged["layers"]["attention"]["wq"], base["layers"]["attention"]["wq"])
    assert cli.main(["export", str(output), str(tmp_path / "hf")]) == 0
    _, exported = mj.load(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, exported, merged)
    capsys.readouterr()
    answers = []
    for checkpoint in (output, tmp_path / "hf"):
        assert cli.main(["generate", "--checkpoint", str(checkpoint), "--prompt-ids", "5,6,7", "--max-new-tokens",
                         "6"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


def test_dpo_flags_are_dpo_only(tmp_path, llama_dir, prefs_file, data_file, capsys) -> None:
    with pytest.raises(SystemExit):
        sft.main(["--beta", "0.2"])  # sft has no DPO flags
    assert "unrecognized arguments: --beta" in capsys.readouterr().err
    config = tmp_path / "sft.json"
    config.write_text(json.dumps({"data": str(data_file), "steps": 2, "loss": "ipo"}))
    assert sft.main(["--config", str(config), "--output", str(tmp_path / "o")]) == 2
    assert "unknown settings ['loss']" in capsys.readouterr().err
    assert dpo.main(_flags(llama_dir, data_file, tmp_path / "chats", "--steps", "2")) == 2  # chats are not pairs
    assert 'chats.jsonl:1: expected an object with "prompt", "chosen" and "rejected"' in capsys.readouterr().err
    assert not (tmp_path / "chats").exists()
    demo = Path(__file__).resolve().parents[2] / "configs" / "dpo" / "smollm2-demo.json"
    parser = program.add_program_flags(argparse.ArgumentParser(), dpo.DPO)
    s = settings.resolve(parser.parse_args(["--config", str(demo), "--output", str(tmp_path)]), "dpo")
    assert Path(s.data).is_file() and s.lora_rank == 16 and s.beta == 0.1 and s.loss == "sigmoid"
    assert s.checkpoint is None  # the embedded SmolLM2
