"""Undecodable input to the command line ends in one clear line and exit status 2, never a traceback."""

import io

import pytest

from mistral_jax import cli

BINARY = bytes(range(128, 256)) * 3 + b"\n"  # no UTF-8 text: every byte is a continuation or lead byte out of place


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_eval_on_a_binary_file_says_it_is_not_text(capsys, tmp_path, suffix):
    data = tmp_path / f"data{suffix}"
    data.write_bytes(BINARY)
    assert cli.main(["eval", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not UTF-8 text" in err and str(data) in err


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale's stdin, and a C locale's
def test_chat_on_binary_stdin_says_it_is_not_text(capsys, monkeypatch, errors):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(BINARY), encoding="utf-8", errors=errors))
    assert cli.main(["chat", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == "mistral-jax chat: error: the input is not UTF-8 text (binary data on stdin?)"
    assert "Traceback" not in err
