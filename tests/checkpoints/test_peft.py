"""Hugging Face PEFT LoRA adapters: transformers + peft's logits on the real SmolLM2 (golden fixture, and live where
peft is installed), `mj.load(base, adapter=)`, `mj.generate(adapter=)`, and adapters for another base refused."""

import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mistral_jax as mj
from mistral_jax import lora
from mistral_jax.checkpoints import peft
from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.checkpoints.errors import CheckpointError
from mistral_jax.checkpoints.load import merge_adapter
from mistral_jax.model import quant

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
GOLDEN = FIXTURES / "peft" / "smollm2_lora"  # made by tests/fixtures/make_fixtures.py (smollm2_peft)
TINY = FIXTURES / "hf" / "llama_mha"


@pytest.fixture(scope="module")
def smollm2():
    return mj.load(default_model_path())


def _assert_matches(ours, last_logits, top_ids, top_logits):
    """Ours [T, V] against transformers + peft: the last row in full and every row's top 5, within 1e-4 of the
    largest logit (as tests/checkpoints/test_gguf.py compares the base model)."""
    scale = np.max(np.abs(last_logits))
    assert np.max(np.abs(ours[-1] - last_logits)) <= 1e-4 * scale
    assert np.max(np.abs(np.take_along_axis(ours, top_ids, axis=-1) - top_logits)) <= 1e-4 * scale
    assert (np.argmax(ours, -1) == top_ids[:, 0]).all()


def test_golden_fixture_is_small_and_peft_made():
    settings = json.loads((GOLDEN / "adapter_config.json").read_text())
    assert (settings["peft_type"], settings["r"], settings["use_rslora"]) == ("LORA", 2, True)
    assert set(settings["target_modules"]) == set(peft.MODULES.values())
    assert sum(f.stat().st_size for f in GOLDEN.iterdir()) < 400_000


def test_smollm2_peft_adapter_matches_transformers_peft(smollm2):
    """The golden adapter (every target module incl. q/k, rsLoRA, three layers, bfloat16 factors) merged into the
    real SmolLM2: transformers + peft's logits. Without it the logits are far off, so the adapter is what matches."""
    config, params = smollm2
    reference = np.load(GOLDEN / "reference.npz")
    tokens = reference["tokens"][None]
    adapter = mj.load_adapter(GOLDEN, config)
    assert adapter.scale == pytest.approx(8 / np.sqrt(2))  # rsLoRA: alpha / sqrt(r), not alpha / r
    untouched = adapter.weights["layers"]["attention"]["wq"]["a"][1]  # a layer outside layers_to_transform
    assert not untouched.any() and adapter.weights["layers"]["attention"]["wq"]["a"][14].any()
    ours = np.asarray(mj.logits(config, merge_adapter(config, params, adapter), tokens))[0]
    _assert_matches(ours, reference["last_logits"], reference["top_ids"], reference["top_logits"])
    base = np.asarray(mj.logits(config, params, tokens))[0]
    assert np.max(np.abs(base[-1] - reference["last_logits"])) > 1.0


@pytest.mark.slow
def test_smollm2_live_peft_adapter_matches(smollm2, tmp_path):
    """The live twin, where torch, transformers and peft are installed: another adapter (attention only, every
    layer, plain alpha / r, float32) made with peft now; every position's full logits."""
    for name in ("torch", "transformers", "peft"):
        pytest.importorskip(name)
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    make_fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixtures)
    config, params = smollm2
    tokens = np.load(GOLDEN / "reference.npz")["tokens"].tolist()
    hf_dir = make_fixtures.export_smollm2(tmp_path / "smollm2")
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    expected = make_fixtures.smollm2_peft_adapter(hf_dir, tmp_path / "adapter", tokens, seed=7, bfloat16=False, r=4,
                                                  lora_alpha=16, target_modules=attention)
    merged = merge_adapter(config, params, tmp_path / "adapter")
    ours = np.asarray(mj.logits(config, merged, np.array([tokens])))[0]
    assert np.max(np.abs(ours - expected)) <= 1e-4 * np.max(np.abs(expected))


def _random_adapter(config, params, targets=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"), seed=0):
    """Random factors (B nonzero, unlike a fresh adapter's) with lora.init's shapes, drawn with numpy."""
    spec = lora.LoraSpec(2, 4.0, targets)
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: lora.init(params, spec, jax.random.key(0)))
    weights = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
    return lora.Adapter(weights, spec.scale, source="random")


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """(config, base params, the Adapter, its PEFT directory) on the tiny Llama fixture."""
    config, params = mj.load(TINY)
    adapter = _random_adapter(config, params)
    directory = peft.write(config, adapter, tmp_path_factory.mktemp("peft") / "adapter", base_model=str(TINY))
    return config, params, adapter, directory


def test_peft_round_trip_and_load_with_adapter(tiny_adapter):
    config, params, adapter, directory = tiny_adapter
    read = mj.load_adapter(directory, config)
    assert read.scale == adapter.scale
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), read.weights, adapter.weights)
    expected = lora.merge(params, adapter.weights, adapter.scale)
    _, merged = mj.load(TINY, adapter=directory)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), merged, expected)
    assert not np.allclose(merged["layers"]["attention"]["wq"], params["layers"]["attention"]["wq"])
    np.testing.assert_array_equal(merged["embedding"], params["embedding"])
    # Unscanned, as decoding prefers it; and int8, quantized after the merge.
    _, unscanned = mj.load(TINY, adapter=directory, scan_layers=False)
    np.testing.assert_allclose(unscanned["layers"]["1"]["mlp"]["w_down"], expected["layers"]["mlp"]["w_down"][1],
                               rtol=1e-5, atol=1e-6)
    qconfig, quantized = mj.load(TINY, adapter=directory, quantize="int8")
    _, expected_q = quant.quantize(config, jax.tree.map(np.array, expected), "int8")  # (it deletes jax inputs)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1), quantized, expected_q)
    # On a mesh (8 devices): the merge runs where the shards are.
    _, sharded = mj.load(TINY, adapter=directory, mesh=mj.make_mesh(fsdp=4, tensor=2))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), sharded, expected)


def test_generate_with_adapter_equals_generate_on_merged_params(tiny_adapter):
    config, params, adapter, directory = tiny_adapter
    config, params = mj.unstack_layers(config, params)
    _, merged = mj.load(TINY, adapter=directory, scan_layers=False)
    prompts = [[5, 6, 7, 8], [9, 10]]
    expected = mj.generate(config, merged, prompts, 12)
    assert mj.generate(config, params, prompts, 12) != expected  # the adapter changes the tokens
    assert mj.generate(config, params, prompts, 12, adapter=directory) == expected
    assert mj.generate(config, params, prompts, 12, adapter=adapter) == expected
    mesh = mj.make_mesh(fsdp=4, tensor=2)  # the merge runs on the mesh's shards
    assert mj.generate(config, params, prompts, 12, adapter=directory, mesh=mesh) == expected
    streamed = np.stack(list(mj.generate_stream(config, params, prompts, 12, adapter=directory)), axis=1)
    assert [row[: len(e)].tolist() for row, e in zip(streamed, expected)] == expected
    # int8 weights: the adapter rides unmerged beside them (model/linear.py), so it changes the tokens there too.
    qconfig, qparams = mj.quantize(config, jax.tree.map(np.array, params), "int8")
    assert mj.generate(qconfig, qparams, prompts, 12, adapter=adapter) != mj.generate(qconfig, qparams, prompts, 12)


def _edit(src: pathlib.Path, dst: pathlib.Path, settings=None, keep=None) -> pathlib.Path:
    """A copy of adapter `src` with adapter_config.json fields changed and only the tensors `keep` accepts."""
    shutil.copytree(src, dst)
    config = json.loads((src / peft.CONFIG_FILE).read_text())
    (dst / peft.CONFIG_FILE).write_text(json.dumps({**config, **(settings or {})}))
    if keep is not None:
        tensors = load_file(src / peft.WEIGHTS_FILE)
        save_file({k: v for k, v in tensors.items() if keep(k)}, dst / peft.WEIGHTS_FILE)
    return dst


def _refused(config, directory, *needles):
    with pytest.raises(CheckpointError) as err:
        mj.load_adapter(directory, config)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def test_adapters_for_another_base_are_refused(tiny_adapter, tmp_path):
    config, _, _, directory = tiny_adapter
    # SmolLM2's adapter on the tiny Llama: a layer it lacks; with layer 0 only, a shape that differs.
    _refused(config, GOLDEN, "model.layers.14.", "llama base (2 layers)", "HuggingFaceTB/SmolLM2-135M-Instruct")
    layer0 = _edit(GOLDEN, tmp_path / "layer0", keep=lambda k: ".layers.0.self_attn.q_proj." in k)
    _refused(config, layer0, "model.layers.0.self_attn.q_proj has lora_A [2, 576], lora_B [576, 2]",
             "[out, in] is [32, 32]")
    # Target modules we do not adapt, settings that change the update, another kind of PEFT adapter.
    _refused(config, _edit(directory, tmp_path / "head", {"target_modules": ["q_proj", "lm_head"]}), "['lm_head']")
    _refused(config, _edit(directory, tmp_path / "dora", {"use_dora": True}), "use_dora=True")
    _refused(config, _edit(directory, tmp_path / "ia3", {"peft_type": "IA3"}), "peft_type is 'IA3'")
    _refused(config, _edit(directory, tmp_path / "alpha", {"alpha_pattern": {"q_proj": 4}}), "alpha_pattern")
    # A base named by a local directory whose architecture differs (same tensor shapes would not tell).
    other = str(FIXTURES / "hf" / "llama_tied_head_dim")
    _refused(config, _edit(directory, tmp_path / "other", {"base_model_name_or_path": other}), "n_kv_heads=2",
             "this base 4")
    # Half a pair, a pickle instead of safetensors, a directory that is no adapter at all.
    _refused(config, _edit(directory, tmp_path / "half", keep=lambda k: "q_proj.lora_B" not in k), "has lora_A but not "
             "lora_B")
    pickled = _edit(directory, tmp_path / "pickled")
    (pickled / peft.WEIGHTS_FILE).rename(pickled / "adapter_model.bin")
    _refused(config, pickled, "pickled")
    _refused(config, TINY, "is not an adapter")
    # An adapter loaded for one model, passed to generate with another.
    other_config, other_params = mj.load(FIXTURES / "hf" / "llama_tied_head_dim")
    expected = r"its wk factors are A \[2, 32, 2\], B \[2, 2, 4, 8\]; this base's wk \[2, 32, 2, 24\]"
    with pytest.raises(mj.UserError, match=expected):
        mj.generate(other_config, other_params, [[5, 6]], 2, adapter=mj.load_adapter(directory, config))


def test_mixtral_attention_and_expert_adapters_round_trip(tmp_path):
    config, params = mj.load(FIXTURES / "hf" / "mixtral_top2")
    attention = _random_adapter(config, params, targets=("wq", "wo"))
    directory = peft.write(config, attention, tmp_path / "attention", base_model="mixtral")
    merged = mj.load(FIXTURES / "hf" / "mixtral_top2", adapter=directory)[1]
    np.testing.assert_allclose(merged["layers"]["attention"]["wo"],
                               lora.merge(params, attention.weights, attention.scale)["layers"]["attention"]["wo"],
                               rtol=1e-5, atol=1e-6)
    # Experts in the classic layout our export writes: one Linear per expert (w1 gate, w3 up, w2 down).
    experts = _random_adapter(config, params, targets=("wq", "w_gate", "w_up", "w_down"))
    directory = peft.write(config, experts, tmp_path / "experts", base_model="mixtral")
    settings = json.loads((directory / peft.CONFIG_FILE).read_text())
    assert settings["target_modules"] == ["q_proj", "w1", "w2", "w3"]
    tensors = load_file(directory / peft.WEIGHTS_FILE)
    a = tensors["base_model.model.model.layers.1.block_sparse_moe.experts.3.w1.lora_A.weight"]  # [r, in]
    b = tensors["base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight"]  # [out, r]
    np.testing.assert_array_equal(a, np.asarray(experts.weights["layers"]["moe"]["w_gate"]["a"][1, 3]).T)
    np.testing.assert_array_equal(b, np.asarray(experts.weights["layers"]["moe"]["w_down"]["b"][1, 3]).T)
    assert len(tensors) == 2 * config.n_layers * (1 + 3 * config.n_experts)
    read = mj.load_adapter(directory, config)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)), read.weights, experts.weights)
    merged = mj.load(FIXTURES / "hf" / "mixtral_top2", adapter=directory)[1]
    np.testing.assert_allclose(merged["layers"]["moe"]["w_up"],
                               lora.merge(params, experts.weights, experts.scale)["layers"]["moe"]["w_up"],
                               rtol=1e-5, atol=1e-6)
    # An expert the base lacks, and an expert factor of another shape, are refused naming the tensor.
    extra = _edit(directory, tmp_path / "extra")
    save_file({**tensors, "base_model.model.model.layers.0.block_sparse_moe.experts.4.w1.lora_A.weight": a,
               "base_model.model.model.layers.0.block_sparse_moe.experts.4.w1.lora_B.weight":
                   tensors["base_model.model.model.layers.1.block_sparse_moe.experts.3.w1.lora_B.weight"]},
              extra / peft.WEIGHTS_FILE)
    _refused(config, extra, "layers.0.block_sparse_moe.experts.4.w1.lora_", "mixtral base (2 layers)")
    narrow = _edit(directory, tmp_path / "narrow")
    key = "base_model.model.model.layers.0.block_sparse_moe.experts.2.w3.lora_B.weight"
    save_file({**tensors, key: tensors[key][:40]}, narrow / peft.WEIGHTS_FILE)
    _refused(config, narrow, "block_sparse_moe.experts.2.w3 has lora_A [2, 32], lora_B [40, 2]", "[48, 32]")
