"""Mistral's consolidated format: made from the tiny HF fixtures (inverse q/k permutation), same logits."""

import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mistral_jax as mj
from mistral_jax.checkpoints.errors import CheckpointError

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def half_split_to_interleaved(w, n_heads):
    """transformers' q/k rows back to the reference's interleaved RoPE pairs (the HF conversion, inverted)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_consolidated(hf_dir: pathlib.Path, out: pathlib.Path, with_optional_fields=True) -> pathlib.Path:
    """Write hf_dir's weights as params.json + consolidated.safetensors with mistral-inference names."""
    hf_config = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    renames = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
               "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
               "input_layernorm": "attention_norm",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1",
               "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
               "block_sparse_moe.gate": "feed_forward.gate", "block_sparse_moe.experts": "feed_forward.experts"}
    tensors = {}
    for name, t in load_file(hf_dir / "model.safetensors").items():
        if name == "model.embed_tokens.weight":
            name = "tok_embeddings.weight"
        elif name == "model.norm.weight":
            name = "norm.weight"
        elif name == "lm_head.weight":
            name = "output.weight"
        else:
            name = name.removeprefix("model.")
            for old, new in renames.items():
                name = name.replace(f".{old}.", f".{new}.")
            if name.endswith("attention.wq.weight"):
                t = half_split_to_interleaved(t, heads)
            elif name.endswith("attention.wk.weight"):
                t = half_split_to_interleaved(t, kv_heads)
        tensors[name] = np.ascontiguousarray(t)
    params = {"dim": hf_config["hidden_size"], "n_layers": hf_config["num_hidden_layers"], "n_heads": heads,
              "n_kv_heads": kv_heads, "norm_eps": hf_config["rms_norm_eps"], "vocab_size": hf_config["vocab_size"]}
    if hf_config.get("head_dim"):
        params["head_dim"] = hf_config["head_dim"]
    if with_optional_fields:
        params["hidden_dim"] = hf_config["intermediate_size"]
        params["rope_theta"] = hf_config["rope_parameters"]["rope_theta"]
        if hf_config.get("sliding_window"):
            params["sliding_window"] = hf_config["sliding_window"]
        if "num_local_experts" in hf_config:
            params["moe"] = {"num_experts": hf_config["num_local_experts"],
                             "num_experts_per_tok": hf_config["num_experts_per_tok"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    save_file(tensors, out / "consolidated.safetensors")
    return out


@pytest.mark.parametrize("case", ["mistral_gqa_window", "mixtral_top2", "llama_tied_head_dim", "mistral_v03_head_dim",
                                  "mixtral_8x22b_heads"])
def test_consolidated_gives_the_hf_logits(case, tmp_path):
    path = to_consolidated(FIXTURES / case, tmp_path / case)
    config, params = mj.load(path)
    hf_config, _ = mj.load(FIXTURES / case)
    same = dict(family=hf_config.family, max_seq_len=hf_config.max_seq_len,
                router_aux_loss_coef=hf_config.router_aux_loss_coef)
    assert config.replace(**same) == hf_config
    reference = np.load(FIXTURES / case / "reference.npz")
    ours = np.asarray(mj.logits(config, params, reference["tokens"]))
    assert np.max(np.abs(ours - reference["logits"])) <= 1e-4 * np.max(np.abs(reference["logits"]))


def test_rope_theta_defaults_to_1e4_and_shapes_fill_in(tmp_path):
    """Mistral 7B v0.1's params.json has no rope_theta, hidden_dim or sliding window keys to rely on."""
    path = to_consolidated(FIXTURES / "llama_mha", tmp_path / "m", with_optional_fields=False)
    config, _ = mj.load(path)
    assert config.rope_theta == 1e4 and config.hidden_dim == 48 and config.sliding_window is None


def test_params_json_without_required_fields(tmp_path):
    path = to_consolidated(FIXTURES / "llama_mha", tmp_path / "m")
    params = json.loads((path / "params.json").read_text())
    del params["n_heads"]
    (path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"params.json: required field\(s\) \['n_heads'\] missing"):
        mj.load(path)


def test_missing_weights(tmp_path):
    path = to_consolidated(FIXTURES / "llama_mha", tmp_path / "m")
    (path / "consolidated.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        mj.load(path)


def test_unexpected_tensor(tmp_path):
    path = to_consolidated(FIXTURES / "llama_mha", tmp_path / "m")
    tensors = load_file(path / "consolidated.safetensors")
    tensors["layers.0.attention.bias"] = np.zeros(3, np.float32)
    save_file(tensors, path / "consolidated.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.0.attention.bias'"):
        mj.load(path)
