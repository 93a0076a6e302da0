"""GGUF reader: tiny models written the way llama.cpp's convert_hf_to_gguf writes them, the real SmolLM2
Q4_1 file, and the errors for bad files."""

import pathlib

import gguf
import jax
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import gguf_file
from mistral_jax.checkpoints import gguf as gguf_reader
from mistral_jax.checkpoints import hf_layout
from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.model.transformer import forward

Q = gguf.GGMLQuantizationType
LLAMA = mj.ModelConfig(family="llama", vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                       norm_eps=1e-6, rope_theta=500000.0, max_seq_len=256, bos_id=5, eos_id=6)
MIXTRAL = LLAMA.replace(family="mixtral", head_dim=32, hidden_dim=96, n_experts=4, n_experts_per_tok=2)
# Each type and the largest error it may make, relative to the largest weight of the tensor.
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2,
             Q.Q4_0: 0.13, Q.Q4_1: 0.13, Q.Q5_0: 0.07, Q.Q5_1: 0.07}
TOKENS = np.array([[5, 17, 3, 99, 42, 17, 3, 99, 0, 127]])

# transformers name -> llama.cpp name, as convert_hf_to_gguf's tensor map has them.
BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "block_sparse_moe.gate": "ffn_gate_inp"}
EXPERTS = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}


def hf_tensors(config: mj.ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random transformers-named float32 tensors for `config` (norm scales around 1)."""
    rng = np.random.default_rng(seed)
    names = hf_layout.from_params(config, mj.init_params(config, jax.random.key(0)))
    return {n: (rng.standard_normal(a.shape) * 0.3 + ("norm" in n)).astype(np.float32) for n, a in names.items()}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: q/k rows to llama.cpp's interleaved RoPE order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_names(config: mj.ModelConfig, tensors: dict, stacked_experts: bool = True) -> dict[str, np.ndarray]:
    """llama.cpp-named tensors: q/k rows permuted, experts stacked [E, out, in] (or one tensor each)."""
    out = {"token_embd.weight": tensors["model.embed_tokens.weight"],
           "output_norm.weight": tensors["model.norm.weight"]}
    if "lm_head.weight" in tensors:
        out["output.weight"] = tensors["lm_head.weight"]
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}
    for i in range(config.n_layers):
        for hf_name, name in BLOCK.items():
            if (w := tensors.get(f"model.layers.{i}.{hf_name}.weight")) is not None:
                out[f"blk.{i}.{name}.weight"] = permute(w, heads[name]) if name in heads else w
        for w_name, name in EXPERTS.items() if config.is_moe else ():
            experts = [tensors[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w_name}.weight"]
                       for e in range(config.n_experts)]
            if stacked_experts:
                out[f"blk.{i}.{name}_exps.weight"] = np.stack(experts)
            else:
                out.update({f"blk.{i}.{name}.{e}.weight": w for e, w in enumerate(experts)})
    return out


def tensor_type(w: np.ndarray, qtype: Q, router: bool) -> Q:
    """llama.cpp keeps 1-D tensors (norms) and the MoE router in F32."""
    return Q.F32 if w.ndim == 1 or router else qtype


def write_gguf(path, config: mj.ModelConfig, tensors: dict, qtype: Q = Q.F32, arch: str = "llama", name: str = "tiny",
               stacked_experts: bool = True, drop: tuple = (), extra: dict | None = None, metadata: dict | None = None):
    """A GGUF file with convert_hf_to_gguf's metadata keys and tensor layout (metadata: more uint32 keys)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    for key, value in (metadata or {}).items():
        writer.add_uint32(key, value)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.resolved_head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_id)
    writer.add_eos_token_id(config.eos_id)
    if config.head_dim is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.is_moe:
        writer.add_expert_count(config.n_experts)
        writer.add_expert_used_count(config.n_experts_per_tok)
    for tensor_name, w in {**to_gguf_names(config, tensors, stacked_experts), **(extra or {})}.items():
        if tensor_name in drop:
            continue
        t = tensor_type(w, qtype, router=".ffn_gate_inp." in tensor_name)
        data = gguf.quants.quantize(w, t)
        writer.add_tensor(tensor_name, data, raw_dtype=t if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def round_trip(tensors: dict, qtype: Q) -> dict[str, np.ndarray]:
    """What each tensor becomes after quantizing and dequantizing (q/k row permutation commutes with it:
    llama.cpp quantizes blocks within a row, and the permutation moves whole rows)."""
    out = {}
    for name, w in tensors.items():
        t = tensor_type(w, qtype, router=name.endswith("block_sparse_moe.gate.weight"))
        out[name] = gguf.quants.dequantize(gguf.quants.quantize(w, t), t)
    return out


@pytest.mark.parametrize("qtype", TOLERANCE, ids=lambda q: q.name)
@pytest.mark.parametrize("config", [LLAMA, MIXTRAL], ids=["llama", "mixtral"])
def test_round_trip_tensors_config_and_logits(tmp_path, config, qtype):
    tensors = hf_tensors(config)
    path = tmp_path / "model.gguf"
    write_gguf(path, config, tensors, qtype, name=f"tiny {config.family}")

    read_config, read_tensors = gguf_reader.read(path)
    assert read_config == config
    assert sorted(read_tensors) == sorted(tensors)
    expected = round_trip(tensors, qtype)
    for name, original in tensors.items():
        got = read_tensors[name]
        assert got.dtype == np.float32 and got.shape == original.shape, name
        np.testing.assert_array_equal(got, expected[name], err_msg=name)
        np.testing.assert_allclose(got, original, rtol=0, atol=TOLERANCE[qtype] * np.abs(original).max(), err_msg=name)

    loaded_config, params = mj.load(path)
    want = mj.logits(config, hf_layout.to_params(config, expected), TOKENS)
    np.testing.assert_allclose(mj.logits(loaded_config, params, TOKENS), want, atol=1e-5, rtol=1e-5)


def test_per_expert_tensors_of_older_files(tmp_path):
    tensors = hf_tensors(MIXTRAL)
    write_gguf(tmp_path / "old.gguf", MIXTRAL, tensors, stacked_experts=False)
    _, read_tensors = gguf_reader.read(tmp_path / "old.gguf")
    for name, original in tensors.items():
        np.testing.assert_array_equal(read_tensors[name], original, err_msg=name)


def test_family_mistral_from_name(tmp_path):
    write_gguf(tmp_path / "m.gguf", LLAMA, hf_tensors(LLAMA), name="Mistral 7B Instruct v0.2 (tiny)")
    config, _ = gguf_reader.read(tmp_path / "m.gguf")
    assert config == LLAMA.replace(family="mistral")


def test_tensors_are_dequantized_only_when_asked_for(tmp_path, monkeypatch):
    write_gguf(tmp_path / "q.gguf", LLAMA, hf_tensors(LLAMA), Q.Q8_0)
    calls = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: calls.append(qtype) or real(data, qtype))
    _, tensors = gguf_reader.read(tmp_path / "q.gguf")
    assert calls == []
    tensors["model.layers.1.mlp.up_proj.weight"]
    assert calls == [Q.Q8_0]


def test_a_file_is_parsed_once_until_it_changes(tmp_path):
    """The loader and the tokenizer share one parse per process; a rewritten file is parsed again."""
    path = tmp_path / "model.gguf"
    write_gguf(path, LLAMA, hf_tensors(LLAMA), name="tiny")
    first = gguf_file.reader(path)
    assert gguf_file.reader(str(path)) is first
    write_gguf(path, LLAMA, hf_tensors(LLAMA), name="Mistral 7B (tiny)")
    assert gguf_file.reader(path) is not first
    assert gguf_reader.read(path)[0] == LLAMA.replace(family="mistral")  # the new file's metadata, not the old


# Errors ------------------------------------------------------------------------------------------
def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file at all")
    assert not gguf_reader.is_gguf(path)
    with pytest.raises(mj.CheckpointError, match="not a GGUF file"):
        mj.load(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, LLAMA, hf_tensors(LLAMA))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert gguf_reader.is_gguf(path)
    with pytest.raises(mj.CheckpointError, match="truncated"):
        gguf_reader.read(path)


def test_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "g.gguf", LLAMA, hf_tensors(LLAMA), arch="gpt2")
    with pytest.raises(mj.CheckpointError, match="architecture 'gpt2'"):
        gguf_reader.read(tmp_path / "g.gguf")


def test_unsupported_quant_type(tmp_path):
    write_gguf(tmp_path / "x.gguf", LLAMA, hf_tensors(LLAMA), Q.MXFP4)
    with pytest.raises(mj.CheckpointError, match="MXFP4"):
        gguf_reader.read(tmp_path / "x.gguf")


def test_missing_tensor(tmp_path):
    write_gguf(tmp_path / "m.gguf", LLAMA, hf_tensors(LLAMA), drop=("blk.1.attn_q.weight",))
    with pytest.raises(mj.CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        mj.load(tmp_path / "m.gguf")


def test_unexpected_tensor(tmp_path):
    """A tensor llama.cpp's llama architecture does not have is refused, not silently dropped."""
    extra = {"blk.0.attn_q_norm.weight": np.ones(LLAMA.resolved_head_dim, np.float32)}
    write_gguf(tmp_path / "r.gguf", LLAMA, hf_tensors(LLAMA), extra=extra)
    with pytest.raises(mj.CheckpointError, match="attn_q_norm"):
        gguf_reader.read(tmp_path / "r.gguf")


HF_FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def llama3_gguf(tmp_path, divisors=None):
    """The llama3_rope_tied HF fixture as llama.cpp writes a Llama 3.x file: rope_freqs.weight holding the llama3
    divisors per frequency (computed as convert_hf_to_gguf does), the original context in the metadata."""
    config, params = mj.load(HF_FIXTURES / "llama3_rope_tied")
    if divisors is None:
        divisors = gguf_reader.llama3_divisors(config.resolved_head_dim, config.rope_theta, config.rope_factor,
                                               config.rope_low_freq_factor, config.rope_high_freq_factor,
                                               config.rope_original_max_seq_len)
    path = tmp_path / "llama3.gguf"
    write_gguf(path, config, hf_layout.from_params(config, params), name="Llama 3.2 (tiny)",
               extra={"rope_freqs.weight": np.asarray(divisors, np.float32)},
               metadata={"llama.rope.scaling.original_context_length": config.rope_original_max_seq_len})
    return config, path


def test_llama3_rope_freqs_give_transformers_logits(tmp_path):
    config, path = llama3_gguf(tmp_path)
    loaded, params = mj.load(path)
    assert loaded == config
    reference = np.load(HF_FIXTURES / "llama3_rope_tied" / "reference.npz")
    ours = jax.jit(forward, static_argnums=0)(loaded, params, reference["tokens"], reference["positions"]).logits
    assert np.max(np.abs(np.asarray(ours) - reference["logits"])) <= 1e-4 * np.max(np.abs(reference["logits"]))


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    with pytest.raises(mj.CheckpointError, match="not llama3 RoPE scaling"):
        mj.load(llama3_gguf(tmp_path, divisors=np.linspace(1, 3, 4))[1])


# The real SmolLM2-135M-Instruct Q4_1 file --------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return mj.load(default_model_path())


def test_smollm2_config_matches_preset(smollm2):
    config, _ = smollm2
    preset = mj.ModelConfig.from_preset("smollm2-135m-instruct")
    for field in ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "resolved_head_dim", "hidden_dim", "vocab_size",
                  "norm_eps", "rope_theta", "max_seq_len", "tie_embeddings", "bos_id", "eos_id", "sliding_window"):
        assert getattr(config, field) == getattr(preset, field), field


def interleave_head_dim(w):
    """Our [..., heads, head_dim] q/k weights as they would be without undoing llama.cpp's permutation."""
    return w.reshape(*w.shape[:-1], 2, w.shape[-1] // 2).swapaxes(-1, -2).reshape(w.shape)


def test_smollm2_copies_a_repeated_pattern(smollm2):
    """Induction: after '504 3458 314 504 3458 314 504' the model predicts 3458. With q/k rows left in
    llama.cpp's order RoPE rotates the wrong pairs and the pattern is lost."""
    config, params = smollm2
    tokens = np.array([[1, 504, 3458, 314, 504, 3458, 314, 504]])
    probs = jax.nn.softmax(mj.logits(config, params, tokens)[0, -1])
    assert np.isfinite(probs).all()
    assert int(np.argmax(probs)) == 3458 and probs[3458] > 0.3

    attention = params["layers"]["attention"]
    permuted = {**params, "layers": {**params["layers"], "attention": {
        **attention, "wq": interleave_head_dim(attention["wq"]), "wk": interleave_head_dim(attention["wk"])}}}
    wrong = jax.nn.softmax(mj.logits(config, permuted, tokens)[0, -1])
    assert int(np.argmax(wrong)) != 3458 and wrong[3458] < 0.01


def test_smollm2_logits_match_transformers(smollm2):
    """The real model, every position: transformers' top-5 logits (and the whole last row) on a chat prompt,
    from tests/fixtures/make_fixtures.py (the GGUF exported to HF and run by transformers in float32)."""
    config, params = smollm2
    reference = np.load(pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "smollm2_reference.npz")
    ours = np.asarray(mj.logits(config, params, reference["tokens"][None]))[0]  # [T, V]
    scale = np.max(np.abs(reference["last_logits"]))
    assert np.max(np.abs(ours[-1] - reference["last_logits"])) <= 1e-4 * scale
    ours_top = np.take_along_axis(ours, reference["top_ids"], axis=-1)
    assert np.max(np.abs(ours_top - reference["top_logits"])) <= 1e-4 * scale
    assert (np.argmax(ours, -1) == reference["top_ids"][:, 0]).all()


def test_smollm2_speculative_greedy_is_unchanged_and_copies_in_fewer_steps(smollm2):
    """Asked to repeat a sentence, prompt lookup (mistral_jax/speculative.py) gives plain greedy's 32 tokens in
    fewer target forwards: it copies once past the answer's preamble."""
    from mistral_jax import decoding

    config, params = smollm2
    passage = "The quick brown fox jumps over the lazy dog near the river bank, then runs into the old forest."
    prompt = mj.load_tokenizer(default_model_path()).apply_chat_template(
        [{"role": "user", "content": f"Repeat this sentence exactly: {passage}"}])
    expected = mj.generate(config, params, [prompt], 32)
    state = decoding.run(config, params, [prompt], 32, draft="prompt-lookup", draft_tokens=8)
    assert np.asarray(state.tokens)[0, :32].tolist() == expected[0]
    assert int(state.steps) <= 27 and int(state.accepted[0]) >= 5  # measured: 26 forwards for 31 tokens, 5 kept
