"""The `mistral-jax` command line: generate (text and raw ids), chat with history, clear errors."""

import io
import pathlib

import jax
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import cli

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf" / "mistral_gqa_window"


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_ids_print_the_generated_ids_last(capsys):
    code, out, err = run(capsys, "generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "9")
    assert code == 0
    config, params = mj.load(FIXTURE)
    expected = mj.generate(config, params, [[5, 6, 7, 8]], 9, eos_id=config.eos_id)[0]
    assert out.strip().splitlines()[-1] == ",".join(map(str, expected))
    assert "prefill:" in err and "decode:" in err and "tok/s" in err


def test_sampling_flags_reach_the_sampler(capsys):
    args = ["generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "5,6", "--max-new-tokens", "12",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed"]
    first = run(capsys, *args, "1")[1].splitlines()[-1]
    again = run(capsys, *args, "1")[1].splitlines()[-1]
    other = run(capsys, *args, "2")[1].splitlines()[-1]
    assert first == again != other


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature: must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be a positive integer"),
        (["--top-k", "-3"], "--top-k: must be >= 0"),
    ],
)
def test_bad_flag_values(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "1,2", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_prompt_ids(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err
    code, _, err = run(capsys, "generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "1,500")
    assert code == 2 and "outside [0, 128)" in err


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and "no such checkpoint" in err


def test_prompt_longer_than_the_context(capsys):
    ids = ",".join(["3"] * 60)  # the fixture's context is 64 tokens
    code, _, err = run(capsys, "generate", "--checkpoint", str(FIXTURE), "--prompt-ids", ids, "--max-new-tokens", "10")
    assert code == 2 and "exceeds the model's context of 64 tokens" in err


def test_checkpoint_without_tokenizer_needs_prompt_ids(capsys):
    code, _, err = run(capsys, "generate", "--checkpoint", str(FIXTURE), "--prompt", "hello")
    assert code == 2 and "no tokenizer" in err


# The embedded default model (SmolLM2-135M-Instruct) ---------------------------------------------

def test_default_model_knows_the_capital_of_france(capsys):
    code, out, _ = run(capsys, "generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "30")
    assert code == 0
    assert "Paris" in out


def test_chat_keeps_history_until_reset(capsys, monkeypatch):
    turns = "What is the capital of France?\nAnd of Germany? Answer with the city.\n/reset\n/exit\nnever read\n"
    code, out, err = run(capsys, "chat", "--max-new-tokens", "30", stdin=turns, monkeypatch=monkeypatch)
    assert code == 0
    answers = [line for line in out.splitlines() if line.strip()]
    assert "Paris" in answers[0]
    assert "Berlin" in " ".join(answers[1:])  # only answerable with the first turn in the history
    assert "[conversation reset]" in err
    assert err.count("decode:") == 2  # "/exit" stopped the loop before the last line


# convert / export ---------------------------------------------------------------------------------

def test_convert_to_orbax_then_generate_from_it(capsys, tmp_path):
    code, _, _ = run(capsys, "convert", str(FIXTURE), str(tmp_path / "orbax"))
    assert code == 0
    ids = "5,6,7,8"
    original = run(capsys, "generate", "--checkpoint", str(FIXTURE), "--prompt-ids", ids)[1].splitlines()[-1]
    converted = run(capsys, "generate", "--checkpoint", str(tmp_path / "orbax"), "--prompt-ids", ids)[1].splitlines()[-1]
    assert converted == original
    code, _, err = run(capsys, "convert", str(FIXTURE), str(tmp_path / "orbax"))
    assert code == 2 and "already exists" in err


def test_export_the_gguf_model_with_its_tokenizer(capsys, tmp_path):
    from mistral_jax.checkpoints.embedded import default_model_path
    from mistral_jax.tokenizers import load_tokenizer

    gguf_path = default_model_path()
    code, _, _ = run(capsys, "export", str(gguf_path), str(tmp_path / "hf"), "--dtype", "bfloat16")
    assert code == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    config, params = mj.load(tmp_path / "hf", dtype="bfloat16")
    config0, params0 = mj.load(gguf_path, dtype="bfloat16")
    assert config == config0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert load_tokenizer(tmp_path / "hf").apply_chat_template(messages) == load_tokenizer(gguf_path).apply_chat_template(messages)


# URLs (gs://): only orbax checkpoints and sft runs are read from one ---------------------------------

@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_gguf_url_is_a_clear_error_before_anything_is_read(capsys, command):
    prompt = ["--prompt-ids", "1,2"] if command == "generate" else []
    code, _, err = run(capsys, command, "--checkpoint", "gs://bucket/models/model.gguf", *prompt)
    assert code == 2 and "gs://bucket/models/model.gguf is a GGUF file" in err  # not gs:/bucket/...
    assert "copy it to local disk or convert it to orbax on gs:// first" in err


def test_local_only_inputs_and_outputs_refuse_urls(capsys, tmp_path):
    code, _, err = run(capsys, "export", str(FIXTURE), "gs://bucket/hf")
    assert code == 2 and "gs://bucket/hf: export writes a Hugging Face directory to local disk only" in err
    code, _, err = run(capsys, "convert", "gs://bucket/hf/model.safetensors", str(tmp_path / "o"))
    assert code == 2 and "is a safetensors file" in err and "convert it to orbax on gs:// first" in err
    output = str(tmp_path / "run")
    code, _, err = run(capsys, "sft", "--data", "gs://bucket/chats.jsonl", "--output", output, "--steps", "1")
    assert code == 2 and "gs://bucket/chats.jsonl: JSONL data (--data) is read from local disk only" in err
    code, _, err = run(capsys, "sft", "--checkpoint", "gs://bucket/m.gguf", "--data", "x.jsonl", "--output", output,
                       "--steps", "1")
    assert code == 2 and "gs://bucket/m.gguf is a GGUF file" in err
    assert not (tmp_path / "run").exists()


def test_a_non_orbax_checkpoint_url_is_a_clear_error():
    from mistral_jax.checkpoints.load import read

    with pytest.raises(mj.CheckpointError, match=r"gs://bucket/hf-dir is not an orbax checkpoint: .* first"):
        read("gs://bucket/hf-dir")
