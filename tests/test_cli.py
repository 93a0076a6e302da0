"""The `mistral-jax` command line: generate (text and raw ids), chat with history, clear errors."""

import io
import pathlib
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mistral_jax as mj
from mistral_jax import cli
from mistral_jax.checkpoints import orbax
from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.paths import as_path
from mistral_jax.tokenizers import load_tokenizer

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf" / "mistral_gqa_window"


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_ids_print_the_generated_ids_last(capsys):
    code, out, err = run(capsys, "generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "5,6,7,8",
                         "--max-new-tokens", "9")
    assert code == 0
    config, params = mj.load(FIXTURE)
    expected = mj.generate(config, params, [[5, 6, 7, 8]], 9, eos_id=config.eos_id)[0]
    assert out.strip().splitlines()[-1] == ",".join(map(str, expected))
    assert "prefill:" in err and "decode:" in err and "tok/s" in err


def test_draft_flags_keep_the_greedy_ids(capsys):
    """--draft with a checkpoint (here the model itself) prints plain greedy's ids; a missing one is one line."""
    code, out, err = run(capsys, "generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "5,6,7,8",
                         "--max-new-tokens", "9", "--draft", str(FIXTURE), "--draft-tokens", "3")
    config, params = mj.load(FIXTURE)
    assert code == 0 and out.strip().splitlines()[-1] == ",".join(map(str, mj.generate(
        config, params, [[5, 6, 7, 8]], 9, eos_id=config.eos_id)[0]))
    counts = re.search(r"drafts kept: (\d+) of (\d+)", err)
    assert counts and 0 < int(counts[1]) == int(counts[2]), err  # speculation ran; the model agrees with itself
    code, _, err = run(capsys, "generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "5,6", "--draft", "nowhere")
    assert code == 2 and "--draft: no such checkpoint: nowhere" in err


def test_sampling_flags_reach_the_sampler(capsys):
    args = ["generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "5,6", "--max-new-tokens", "12",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed"]
    first = run(capsys, *args, "1")[1].splitlines()[-1]
    again = run(capsys, *args, "1")[1].splitlines()[-1]
    other = run(capsys, *args, "2")[1].splitlines()[-1]
    assert first == again != other
    greedy = run(capsys, *args[:-7], "--temperature", "0")[1].splitlines()[-1]
    for narrow in (["--top-k", "1", "--top-p", "1"], ["--top-k", "0", "--top-p", "1e-6"]):  # one token left to draw
        for seed in ("1", "2"):
            assert run(capsys, *args[:-7], "--temperature", "1.0", *narrow, "--seed", seed)[1].splitlines()[-1] \
                == greedy != first, (narrow, seed)


def test_penalty_and_min_p_flags_reach_the_sampler(capsys):
    """--repetition-penalty and --min-p give mj.generate's ids with the same settings (and change them)."""
    args = ["generate", "--checkpoint", str(FIXTURE), "--prompt-ids", "5,6,5,6", "--max-new-tokens", "12"]
    config, params = mj.load(FIXTURE)
    plain = mj.generate(config, params, [[5, 6, 5, 6]], 12, eos_id=config.eos_id)[0]
    for flags, settings in [(["--repetition-penalty", "3"], {"repetition_penalty": 3.0}),
                            (["--min-p", "0.3", "--temperature", "1.5", "--seed", "4"],
                             {"min_p": 0.3, "temperature": 1.5, "seed": 4})]:
        ids = run(capsys, *args, *flags)[1].strip().splitlines()[-1]
        expected = mj.generate(config, params, [[5, 6, 5, 6]], 12, eos_id=config.eos_id, **settings)[0]
        assert ids == ",".join(map(str, expected)), flags
        assert expected != plain, flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--min-p", "1.5"], "--min-p: must be in [0, 1]"),
        (["--repetition-penalty", "0"], "--repetition-penalty: must be a finite number > 0"),
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
    converted = run(capsys, "generate", "--checkpoint", str(tmp_path / "orbax"), "--prompt-ids", ids)[1]
    converted = converted.splitlines()[-1]
    assert converted == original
    code, _, err = run(capsys, "convert", str(FIXTURE), str(tmp_path / "orbax"))
    assert code == 2 and "already exists" in err


def test_export_the_gguf_model_with_its_tokenizer(capsys, tmp_path):
    gguf_path = default_model_path()
    code, _, _ = run(capsys, "export", str(gguf_path), str(tmp_path / "hf"), "--dtype", "bfloat16")
    assert code == 0
    written = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= written
    config, params = mj.load(tmp_path / "hf", dtype="bfloat16")
    config0, params0 = mj.load(gguf_path, dtype="bfloat16")
    assert config == config0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    exported = load_tokenizer(tmp_path / "hf").apply_chat_template(messages)
    assert exported == load_tokenizer(gguf_path).apply_chat_template(messages)


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


# Errors: a user's mistake is one line with exit status 2, a bug raises with its traceback ---------------

@pytest.mark.parametrize("bug", [ValueError("an internal check failed"), KeyError("layers")])
def test_a_bug_raises_instead_of_printing_one_line(monkeypatch, bug):
    def command(args):
        raise bug

    monkeypatch.setattr(cli, "cmd_plan", command)
    with pytest.raises(type(bug)):
        cli.main(["plan", "--preset", "tiny-llama", "--devices", "1"])


@pytest.mark.parametrize("command", ["convert", "export"])
def test_an_output_under_a_file_is_one_line(capsys, tmp_path, command):
    (tmp_path / "file").write_text("not a directory")
    code, _, err = run(capsys, command, str(FIXTURE), str(tmp_path / "file" / "x"))
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file, not a directory" in err


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_taken_output_fails_before_the_model_is_loaded(capsys, tmp_path, monkeypatch, command):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    monkeypatch.setattr(cli, "load_checkpoint", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    code, _, err = run(capsys, command, str(FIXTURE), str(tmp_path / "taken"))
    assert code == 2 and "already exists and is not empty" in err


def test_a_failed_convert_leaves_no_output_and_a_retry_succeeds(capsys, tmp_path, monkeypatch):
    class FailsAfterSaving(ocp.StandardCheckpointer):
        def save(self, directory, *args, **kwargs):
            super().save(directory, *args, **kwargs)
            self.wait_until_finished()
            raise OSError("disk full")

    monkeypatch.setattr(orbax.ocp, "StandardCheckpointer", FailsAfterSaving)
    code, _, err = run(capsys, "convert", str(FIXTURE), str(tmp_path / "orbax"))
    assert code == 2 and "disk full" in err
    assert list(tmp_path.iterdir()) == []  # neither DST nor a temporary directory beside it
    monkeypatch.undo()
    code, _, _ = run(capsys, "convert", str(FIXTURE), str(tmp_path / "orbax"))
    assert code == 0 and orbax.is_orbax_dir(tmp_path / "orbax")
    assert [p.name for p in tmp_path.iterdir()] == ["orbax"]


def test_a_convert_to_a_url_killed_part_way_can_be_rerun(capsys, gcs_bucket, monkeypatch):
    """gs:// on the GCS emulator (the gcs_bucket fixture), real orbax: the first save writes its arrays there, then
    dies; the rerun replaces what it left and finishes a checkpoint that loads as the original."""

    class DiesAfterTheFirstSave(ocp.StandardCheckpointer):
        saves = 0

        def save(self, directory, *args, **kwargs):
            super().save(directory, *args, **kwargs)
            self.wait_until_finished()
            DiesAfterTheFirstSave.saves += 1
            if DiesAfterTheFirstSave.saves == 1:
                raise OSError("connection reset")

    monkeypatch.setattr(orbax.ocp, "StandardCheckpointer", DiesAfterTheFirstSave)
    url = f"{gcs_bucket}/ckpt"
    where = as_path(url)
    code, _, err = run(capsys, "convert", str(FIXTURE), url)
    assert code == 2 and "connection reset" in err
    assert (where / orbax.PARAMS_DIR).exists() and not (where / orbax.CONFIG_FILE).exists()  # saved, unfinished
    code, _, err = run(capsys, "convert", str(FIXTURE), url)
    assert code == 0, err
    assert sorted(p.name for p in where.iterdir()) == [orbax.CONFIG_FILE, orbax.PARAMS_DIR]
    (config, params), (config0, params0) = mj.load(url), mj.load(FIXTURE)
    assert config == config0
    jax.tree.map(np.testing.assert_array_equal, params, params0)
    code, _, err = run(capsys, "convert", str(FIXTURE), url)  # a finished checkpoint is never replaced
    assert code == 2 and "already exists and is not empty" in err
    as_path(f"{gcs_bucket}/other/x").write_text("x")  # nor a directory that is not ours
    code, _, err = run(capsys, "convert", str(FIXTURE), f"{gcs_bucket}/other")
    assert code == 2 and "already exists and is not empty" in err
    assert DiesAfterTheFirstSave.saves == 2


def test_chat_refuses_a_message_too_long_for_the_context_and_keeps_the_conversation(capsys, monkeypatch):
    long, last_question = "hello " * 9000, "And what did I ask you first?"  # SmolLM2's context is 8192 tokens
    turns = f"What is the capital of France?\n{long}\n{last_question}\n"
    code, _, err = run(capsys, "chat", "--max-new-tokens", "3", stdin=turns, monkeypatch=monkeypatch)
    assert code == 0
    assert "send a shorter one (the conversation is kept)" in err and "dropped" not in err
    prompts = [int(line.split("[prefill: ")[1].split()[0]) for line in err.splitlines() if "[prefill:" in line]
    alone = len(load_tokenizer(default_model_path()).apply_chat_template([{"role": "user", "content": last_question}]))
    assert len(prompts) == 2 and prompts[1] > alone + 3  # the first question and answer are still in the prompt


@pytest.mark.slow
def test_generate_json_schema_answers_valid_json_and_names_a_bad_schema(capsys, tmp_path):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    code, out, _ = run(capsys, "generate", "--prompt", "Describe a person as JSON.", "--json-schema",
                       str(tmp_path / "schema.json"), "--max-new-tokens", "40")
    assert code == 0
    jsonschema.validate(json.loads(out.strip()), schema)
    (tmp_path / "bad.json").write_text('{"type": "bogus"}')
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--json-schema", str(tmp_path / "bad.json"))
    assert code != 0 and "--json-schema" in err and "does not compile" in err and "Traceback" not in err
