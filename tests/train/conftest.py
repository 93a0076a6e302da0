"""Fixtures for the SFT tests: the tokenizer, a tiny model saved with it, a chat JSONL file (tests/conftest.py
sets up the session's compilation cache)."""

import json
from pathlib import Path

import pytest
from sft_helpers import CHATML, chats, save_model, train_tokenizer, write_jsonl

from mistral_jax.tokenizers import Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """tokenizer.json + tokenizer_config.json (ChatML template, <|im_end|> as EOS, no BOS)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer().save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return save_model(tmp_path_factory.mktemp("models") / "tiny-llama", "tiny-llama", tokenizer_dir)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", chats())


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, llama_dir, data_file) -> Path:
    """A 4-step LoRA run (rank 4 on wq, wv, w_down; bfloat16 compute, remat) on the tiny Llama: test_sft_cli.py
    checks how it merges and exports, test_sft_peft.py its PEFT export."""
    from train import sft

    output = tmp_path_factory.mktemp("runs") / "lora"
    flags = ["--checkpoint", str(llama_dir), "--data", str(data_file), "--output", str(output), "--batch-size", "2",
             "--seq-len", "64", "--learning-rate", "3e-3", "--log-every", "1", "--eval-fraction", "0.2", "--steps",
             "4", "--lora-rank", "4", "--lora-targets", "wq,wv,w_down", "--compute-dtype", "bfloat16", "--remat"]
    assert sft.main(flags) == 0
    return output
