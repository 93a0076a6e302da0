"""Hugging Face checkpoints: logits equal transformers' on every family; clear errors for bad directories."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mistral_jax as mj
from mistral_jax.checkpoints import hf
from mistral_jax.checkpoints.errors import CheckpointError
from mistral_jax.model.transformer import forward

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").is_file())


def test_every_family_has_a_fixture():
    assert {"llama_mha", "llama_tied_head_dim", "mistral_gqa_window", "mixtral_top2", "mixtral_top1",
            "mixtral_top2_fused_layout", "mistral_v03_head_dim", "ministral_layer_types", "llama3_rope_tied",
            "mixtral_8x22b_heads"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    config, params = mj.load(FIXTURES / case)
    reference = np.load(FIXTURES / case / "reference.npz")
    tokens = reference["tokens"]
    positions = reference["positions"] if "positions" in reference else np.broadcast_to(np.arange(tokens.shape[1]),
                                                                                         tokens.shape)
    ours = np.asarray(jax.jit(forward, static_argnums=0)(config, params, tokens, positions).logits)
    expected = reference["logits"]
    assert ours.shape == expected.shape
    assert np.max(np.abs(ours - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_config_fields_are_read():
    tied, _ = mj.load(FIXTURES / "llama_tied_head_dim")
    assert (tied.family, tied.tie_embeddings, tied.head_dim, tied.rope_theta) == ("llama", True, 24, 500.0)
    mistral, _ = mj.load(FIXTURES / "mistral_gqa_window")
    assert (mistral.family, mistral.sliding_window, mistral.n_kv_heads, mistral.rope_theta) == ("mistral", 5, 2, 1e6)
    mixtral, params = mj.load(FIXTURES / "mixtral_top1")
    assert (mixtral.n_experts, mixtral.n_experts_per_tok, mixtral.n_kv_heads) == (4, 1, 1)
    assert params["layers"]["moe"]["w_gate"].shape == (2, 4, 32, 48)  # [layers, experts, dim, hidden]


def test_fused_and_classic_expert_layouts_give_the_same_params():
    _, classic = mj.load(FIXTURES / "mixtral_top2")
    _, fused = mj.load(FIXTURES / "mixtral_top2_fused_layout")
    for name in ("router", "w_gate", "w_up", "w_down"):
        np.testing.assert_array_equal(classic["layers"]["moe"][name], fused["layers"]["moe"][name])


def test_bfloat16_load():
    config, params = mj.load(FIXTURES / "llama_mha", dtype="bfloat16")
    assert config.dtype == config.param_dtype == "bfloat16"
    assert params["embedding"].dtype.name == "bfloat16"
    reference = np.load(FIXTURES / "llama_mha" / "reference.npz")
    ours = np.asarray(mj.logits(config, params, reference["tokens"]))
    assert ours.dtype == np.float32
    assert np.max(np.abs(ours - reference["logits"])) <= 0.05 * np.max(np.abs(reference["logits"]))


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"rope_theta": 5e5}, 5e5),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 2e6}}, 2e6),
        ({}, 1e4),
    ],
)
def test_rope_theta_classic_and_new_fields(fields, expected):
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100}
    assert hf.config_from_hf({**base, **fields}).rope_theta == expected


def test_unsupported_rope_scaling_is_refused():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}}
    with pytest.raises(CheckpointError, match="yarn"):
        hf.config_from_hf(base)


def test_new_family_fields_are_read():
    ministral, _ = mj.load(FIXTURES / "ministral_layer_types")
    assert (ministral.family, ministral.sliding_window) == ("ministral", 4)
    assert ministral.layer_windows == (4, None, 4) and ministral.mixed_windows
    llama3, _ = mj.load(FIXTURES / "llama3_rope_tied")
    assert (llama3.rope_scaling, llama3.rope_factor, llama3.rope_original_max_seq_len) == ("llama3", 8.0, 256)
    assert llama3.tie_embeddings and llama3.rope_theta == 5e5
    v03, _ = mj.load(FIXTURES / "mistral_v03_head_dim")
    assert (v03.vocab_size, v03.head_dim, v03.dim, v03.n_heads, v03.sliding_window) == (32768, 8, 8, 2, None)
    big, _ = mj.load(FIXTURES / "mixtral_8x22b_heads")
    assert (big.n_heads, big.n_kv_heads, big.n_experts, big.n_experts_per_tok) == (48, 8, 8, 2)


@pytest.mark.parametrize("rope", [{"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e4},
                                  {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}])
def test_linear_rope_scaling_both_spellings(rope):
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100}
    config = hf.config_from_hf({**base, **rope})
    assert (config.rope_scaling, config.rope_factor, config.rope_theta) == ("linear", 2.0, 1e4)
    assert hf.config_from_hf(hf.config_to_hf(config)) == config


def test_config_round_trips_through_hf_json():
    config, _ = mj.load(FIXTURES / "mixtral_top2")
    assert hf.config_from_hf(hf.config_to_hf(config)) == config.replace(dtype="float32", param_dtype="float32")


# Errors -------------------------------------------------------------------------------------------

@pytest.fixture
def llama_copy(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama_mha", target)
    return target


def _edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        mj.load(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        mj.load(tmp_path)


def test_unknown_model_type(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'gpt2'"):
        mj.load(llama_copy)


def test_missing_config_field(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    del config["hidden_size"]
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
        mj.load(llama_copy)


def test_missing_weights_file(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        mj.load(llama_copy)


def test_missing_tensor_is_named(llama_copy):
    _edit_tensors(llama_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        mj.load(llama_copy)


def test_unexpected_tensor_is_named(llama_copy):
    _edit_tensors(llama_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*q_proj\.bias"):
        mj.load(llama_copy)


def test_shape_mismatch_is_named(llama_copy):
    _edit_tensors(llama_copy, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for tensor 'model\.norm\.weight': got \(31,\)"):
        mj.load(llama_copy)


def test_truncated_safetensors_file(llama_copy):
    data = (llama_copy / "model.safetensors").read_bytes()
    (llama_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        mj.load(llama_copy)


def test_sharded_checkpoint_with_index(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    (llama_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, llama_copy / file)
        weight_map.update({n: file for n in part})
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config, params = mj.load(llama_copy)
    reference = np.load(llama_copy / "reference.npz")
    ours = np.asarray(mj.logits(config, params, reference["tokens"]))
    assert np.max(np.abs(ours - reference["logits"])) <= 1e-4 * np.max(np.abs(reference["logits"]))

    (llama_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        mj.load(llama_copy)


def test_pickle_weights_are_never_loaded(llama_copy):
    (llama_copy / "model.safetensors").rename(llama_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickles are never loaded"):
        mj.load(llama_copy)


# Export -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["mixtral_top2_fused_layout", "llama_tied_head_dim", "mistral_gqa_window"])
def test_hf_to_ours_to_hf_is_exact(case, tmp_path):
    config, params = mj.load(FIXTURES / case)
    out = hf.write(config, params, tmp_path / "export")
    original = load_file(FIXTURES / case.removesuffix("_fused_layout") / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    written = json.loads((out / "config.json").read_text())
    assert hf.config_from_hf(written) == config


def test_export_shards_with_an_index_and_reloads(tmp_path):
    config, params = mj.load(FIXTURES / "mixtral_top1")
    out = hf.write(config, params, tmp_path / "export", extra_files=[FIXTURES / "mixtral_top1" / "reference.npz"],
                   max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert (out / "reference.npz").is_file()
    _, again = mj.load(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_export_never_leaves_a_half_written_directory(tmp_path, monkeypatch):
    config, params = mj.load(FIXTURES / "llama_mha")
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        hf.write(config, params, tmp_path / "export", max_shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        hf.write(config, params, tmp_path / "taken")
