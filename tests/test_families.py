"""The family table is what every reader of "which family" asks: config.json, GGUF, params.json, tokenizers."""

import json
import pathlib

import pytest

import mistral_jax as mj
from mistral_jax import families
from mistral_jax.checkpoints import hf
from mistral_jax.errors import UserError
from mistral_jax.tokenizers import Llama2Chat, MistralInstruct
from mistral_jax.tokenizers.chat_templates import default_chat_format

BASE = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
        "vocab_size": 100, "sliding_window": 16}


@pytest.mark.parametrize("family", families.NAMES)
def test_config_json_round_trips_through_the_table(family):
    info = families.get(family)
    config = hf.config_from_hf({**BASE, "model_type": info.hf_model_types[0]})
    assert config.family == family
    written = hf.config_to_hf(config)
    assert (written["model_type"], written["architectures"]) == (info.hf_model_types[0], [info.hf_architectures[0]])
    assert hf.config_from_hf(written) == config
    assert (config.sliding_window is None) == (info.window_pattern == "none")  # Llama ignores sliding_window


def test_architectures_alone_name_the_family():
    assert families.from_hf({"architectures": ["MinistralForCausalLM"]}).name == "ministral"
    assert families.from_hf({"model_type": "gpt2", "architectures": ["MistralForCausalLM"]}) is None


def test_unknown_model_type_names_the_known_ones():
    with pytest.raises(mj.CheckpointError, match="ministral"):
        hf.config_from_hf({**BASE, "model_type": "gemma"})


def test_layer_types_from_config_json():
    ministral = {**BASE, "model_type": "ministral"}
    mixed = hf.config_from_hf({**ministral, "layer_types": ["full_attention", "sliding_attention"]})
    assert (mixed.sliding_window, mixed.layer_windows) == (16, (None, 16))
    assert hf.config_from_hf({**ministral, "layer_types": ["sliding_attention"] * 2}).layer_types is None
    full = hf.config_from_hf({**ministral, "layer_types": ["full_attention"] * 2})
    assert (full.sliding_window, full.layer_types) == (None, None)
    with pytest.raises(mj.CheckpointError, match="layer_types"):
        hf.config_from_hf({**ministral, "layer_types": ["sliding_attention"]})
    with pytest.raises(mj.CheckpointError, match="ministral"):  # a Mistral config.json cannot say it
        hf.config_to_hf(mixed.replace(family="mistral"))


def test_gguf_architecture_tells_families_apart_by_experts_and_name():
    assert families.from_gguf("llama", "Meta Llama 3.1 8B", 0).name == "llama"
    assert families.from_gguf("llama", "Mistral Nemo Instruct 2407", 0).name == "mistral"
    assert families.from_gguf("llama", "Mixtral 8x22B", 8).name == "mixtral"
    assert families.from_gguf("gpt2", "x", 0) is None
    assert families.gguf_architectures() == ("llama",)


def test_consolidated_keys_map_params_json():
    assert families.consolidated_family(moe=True).name == "mixtral"
    keys = families.consolidated_family(moe=False).consolidated_keys
    assert keys["max_position_embeddings"] == keys["max_seq_len"] == "max_seq_len"


def test_chat_format_and_family_names_come_from_the_table(tmp_path):
    assert isinstance(default_chat_format("ministral"), MistralInstruct)
    assert isinstance(default_chat_format("llama"), Llama2Chat)
    with pytest.raises(UserError, match="ministral"):
        mj.load_tokenizer(tmp_path, family="gemma")
    with pytest.raises(UserError, match="family"):
        mj.ModelConfig(family="gemma")
    tokenizer_json = pathlib.Path(__file__).parent / "fixtures" / "llama3_tokenizer" / "tokenizer.json"
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())  # no template beside it
    for model_type, chat_format in (("ministral", MistralInstruct), ("llama", Llama2Chat)):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert isinstance(mj.load_tokenizer(tmp_path).chat_format, chat_format)
