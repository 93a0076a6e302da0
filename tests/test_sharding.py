"""The mesh, the rules table and sharded decoding on 8 fake CPU devices (tests/conftest.py)."""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import mistral_jax as mj
from mistral_jax import decoding, distributed, sharding
from mistral_jax.compile_stats import CompileStats

PROMPTS = [[1, 2, 3, 4, 5], [7, 8]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def models():
    """Per preset: config, params, unsharded reference logits and greedy tokens."""
    out = {}
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 11), 0, 256))
    for preset in ("tiny-mistral", "tiny-mixtral"):
        config = mj.ModelConfig.from_preset(preset)
        params = mj.init_params(config, jax.random.key(0))
        out[preset] = {
            "config": config,
            "params": params,
            "tokens": tokens,
            "logits": np.asarray(mj.logits(config, params, tokens)),
            "generated": mj.generate(config, params, PROMPTS, NEW_TOKENS),
        }
    return out


def device0_fraction(params) -> float:
    device0 = jax.devices()[0]
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    shards = (s for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards)
    held = sum(s.data.nbytes for s in shards if s.device == device0)
    return held / total


def test_mixtral_parameters_split_over_experts_heads_and_fsdp(models):
    config, params = models["tiny-mixtral"]["config"], models["tiny-mixtral"]["params"]
    mesh = mj.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    placed = mj.shard_params(config, params, mesh)
    assert device0_fraction(placed) <= 0.30
    layers = placed["layers"]
    for name in ("w_gate", "w_up", "w_down"):  # [layers, expert, ...]
        assert layers["moe"][name].sharding.spec[1] == "expert"
    assert layers["moe"]["w_gate"].sharding.spec == P(None, "expert", "fsdp", "tensor")
    for name in ("wq", "wk", "wv"):  # [layers, embed, heads, head_dim]
        assert layers["attention"][name].sharding.spec == P(None, "fsdp", "tensor")
    assert layers["attention"]["wo"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert placed["embedding"].sharding.spec == P("tensor", "fsdp")
    assert placed["lm_head"].sharding.spec == P("fsdp", "tensor")
    # Host numpy arrays are placed the same way, each device building only its own shard.
    from_host = mj.shard_params(config, jax.tree.map(np.asarray, params), mesh)
    assert jax.tree.map(lambda a: a.sharding, from_host) == jax.tree.map(lambda a: a.sharding, placed)
    w_up = lambda tree: np.asarray(tree["layers"]["moe"]["w_up"])  # noqa: E731
    np.testing.assert_array_equal(w_up(from_host), w_up(params))
    with pytest.raises(ValueError, match=r"missing \[\"\['lm_head'\]\"\]"):
        mj.shard_params(config, {k: v for k, v in params.items() if k != "lm_head"}, mesh)
    with pytest.raises(ValueError, match=r"\['embedding'\] has shape \(255, 64\)"):
        mj.shard_params(config, {**params, "embedding": params["embedding"][:255]}, mesh)


def test_dimensions_that_do_not_divide_fall_back_to_replication():
    mesh = mj.make_mesh(data=2, fsdp=1, expert=1, tensor=4)
    # Axes of size 1 and trailing replicated dimensions are left out, as jit writes its outputs' specs.
    assert sharding.fit_spec((64, 2, 16), ("embed", "kv_heads", "head_dim"), mesh) == P()
    assert sharding.fit_spec((64, 4, 16), ("embed", "q_heads", "head_dim"), mesh) == P(None, "tensor")
    assert sharding.fit_spec((4, 7), ("batch", "length"), mesh) == P("data")
    assert sharding.fit_spec((1, 7), ("batch", "length"), mesh) == P()  # data=2 does not divide 1
    mesh = mj.make_mesh(data=2, fsdp=4)
    assert sharding.fit_spec((2, 7), ("batch", "length"), mesh) == P("data")
    assert sharding.fit_spec((8, 7), ("batch", "length"), mesh) == P(("data", "fsdp"))
    assert sharding.fit_spec((7, 64), ("length", "embed"), mesh) == P(None, "fsdp")
    with pytest.raises(ValueError, match="no rule"):
        sharding.fit_spec((8,), ("heads",), mesh)


MESHES = [
    ("tiny-mixtral", (1, 2, 2, 2)),
    ("tiny-mixtral", (1, 1, 4, 2)),
    ("tiny-mistral", (1, 8, 1, 1)),
    ("tiny-mistral", (2, 1, 1, 4)),  # tensor=4 > 2 KV heads: K/V weights and cache replicate that dim
]


@pytest.mark.parametrize("preset,shape", MESHES)
def test_sharded_logits_and_greedy_tokens_equal_unsharded(models, preset, shape):
    model = models[preset]
    config = model["config"]
    mesh = mj.make_mesh(*shape)
    params = mj.shard_params(config, model["params"], mesh)
    logits = mj.logits(config, params, model["tokens"], mesh=mesh)
    ref = model["logits"]
    assert np.max(np.abs(np.asarray(logits) - ref)) <= 1e-5 * np.max(np.abs(ref))
    assert mj.generate(config, params, PROMPTS, NEW_TOKENS, mesh=mesh) == model["generated"]
    if shape == (1, 2, 2, 2):
        streamed = np.stack(list(mj.generate_stream(config, params, PROMPTS, NEW_TOKENS, mesh=mesh)), axis=1)
        assert streamed.tolist() == model["generated"]
        # Unplaced parameters are placed on the way in.
        assert mj.generate(config, model["params"], PROMPTS, NEW_TOKENS, mesh=mesh) == model["generated"]


@pytest.mark.parametrize("preset,shape", [("tiny-mixtral", (1, 2, 2, 2)), ("tiny-mistral", (2, 2, 1, 2))])
def test_unscanned_layout_sharded_equals_unsharded(models, preset, shape):
    """One parameter subtree and one [B*K, S, D] cache buffer per layer: the same tokens on a mesh, each
    layer's weights split like the stacked ones, the per-layer cache split on batch."""
    model = models[preset]
    config, params = mj.unstack_layers(model["config"], model["params"])
    mesh = mj.make_mesh(*shape)
    placed = mj.shard_params(config, params, mesh)
    stacked_spec = mj.shard_params(model["config"], model["params"], mesh)["layers"]["attention"]["wq"].sharding.spec
    assert P(*placed["layers"]["1"]["attention"]["wq"].sharding.spec) == P(*stacked_spec[1:])
    assert mj.generate(config, placed, PROMPTS, NEW_TOKENS, mesh=mesh) == model["generated"]
    cache = mj.init_cache(config, 2, 32, mesh=mesh)
    assert len(cache["k"]) == config.n_layers
    assert cache["k"][0].shape == (2 * config.n_kv_heads, config.cache_size(32), 16)
    assert cache["k"][0].sharding.spec[0] == {(1, 2, 2, 2): "fsdp", (2, 2, 1, 2): "data"}[shape]  # a batch of 2


def test_kv_cache_is_split_on_batch_and_kv_heads(models):
    config, params = models["tiny-mistral"]["config"], models["tiny-mistral"]["params"]
    mesh = mj.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    placed = mj.shard_params(config, params, mesh)
    kv_spec = P(None, "fsdp", "tensor")  # [layers, batch, kv_heads, slots, head_dim]; data=1
    cache = mj.init_cache(config, 2, 32, mesh=mesh)
    assert cache["k"].sharding.spec == kv_spec and cache["v"].sharding.spec == kv_spec
    assert cache["pos"].sharding.spec == P("fsdp")
    assert cache["k"].addressable_shards[0].data.shape == (config.n_layers, 1, 1, 8, 16)

    prompts, positions = [[1, 2, 3], [4, 5, 6]], [[0, 1, 2]] * 2
    logits, cache = decoding.prefill(config, placed, cache, prompts, positions, mesh=mesh)
    ref_logits, ref_cache = decoding.prefill(config, params, mj.init_cache(config, 2, 32), prompts, positions)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    tokens, step_positions = jnp.array([7, 8]), jnp.array([3, 3])
    logits, cache = decoding.decode_step(config, placed, cache, tokens, step_positions, mesh=mesh)
    ref_logits, ref_cache = decoding.decode_step(config, params, ref_cache, tokens, step_positions)
    assert cache["k"].sharding.spec == kv_spec and cache["pos"].sharding.spec == P("fsdp")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache["k"]), np.asarray(ref_cache["k"]), rtol=1e-5, atol=1e-6)
    with CompileStats() as compiled:
        for step in range(4, 7):  # host inputs go straight to their shards: nothing else compiles either
            tokens, positions = np.array([7, 8]), np.array([step, step])
            logits, cache = decoding.decode_step(config, placed, cache, tokens, positions, mesh=mesh)
        jax.block_until_ready(logits)
    assert compiled.compilations == 0

    # More tensor slices than KV heads: the heads dimension stays whole, the batch is still split.
    wide = mj.make_mesh(data=2, fsdp=1, expert=1, tensor=4)
    cache = mj.init_cache(config, 2, 32, mesh=wide)
    assert cache["k"].sharding.spec == P(None, "data")


def test_make_mesh_axes_and_errors():
    mesh = mj.make_mesh(tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert mj.make_mesh(devices=jax.devices()[:2]).shape["fsdp"] == 2
    with pytest.raises(ValueError, match="has 16 devices, but there are 8"):
        mj.make_mesh(data=2, fsdp=2, expert=2, tensor=2)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        mj.make_mesh(tensor=3)
    with pytest.raises(ValueError, match="positive integer"):
        mj.make_mesh(expert=0)


def test_parse_mesh():
    assert sharding.parse_mesh("data=1,fsdp=2,expert=2,tensor=2") == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    assert sharding.parse_mesh(" tensor = 4 ") == {"tensor": 4}
    for text, message in [
        ("", "empty mesh"),
        ("model=2", "unknown mesh axis 'model'"),
        ("tensor=2,tensor=4", "given twice"),
        ("tensor", "expected AXIS=SIZE"),
        ("tensor=two", "expected AXIS=SIZE"),
        ("fsdp=0", "positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            sharding.parse_mesh(text)


def test_distributed_flags_and_single_process(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
                 "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    parser = distributed.add_distributed_flags(argparse.ArgumentParser())
    args = parser.parse_args(["--mesh", "fsdp=4,tensor=2"])
    assert args.coordinator is None and args.num_processes is None and args.process_id is None
    mesh = distributed.setup(args)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    assert distributed.setup(parser.parse_args([])) is None
    assert distributed.is_main_process()
    assert distributed.initialize(num_processes=1) is False
    with pytest.raises(ValueError, match="missing --num-processes, --process-id"):
        distributed.initialize(coordinator="127.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    with pytest.raises(ValueError, match="outside"):
        distributed.initialize(coordinator="127.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "x")
    with pytest.raises(ValueError, match="must be an integer"):
        distributed.initialize()


def test_load_streams_onto_the_mesh_and_orbax_restores_onto_another(tmp_path):
    """mj.load(mesh=) places each leaf with its sharding; an orbax checkpoint saved from one mesh
    restores onto a different one (and onto none) with the same values."""
    from mistral_jax.checkpoints import orbax

    fixture = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf" / "mixtral_top2"
    mesh_a = mj.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    config, params = mj.load(fixture, mesh=mesh_a)
    assert params["layers"]["moe"]["w_gate"].sharding.is_equivalent_to(
        sharding.param_shardings(config, mesh_a)["layers"]["moe"]["w_gate"], 4)
    orbax.write(config, params, tmp_path / "ckpt")

    mesh_b = mj.make_mesh(data=2, fsdp=1, expert=4, tensor=1)
    _, restored = mj.load(tmp_path / "ckpt", mesh=mesh_b)
    _, plain = mj.load(fixture)
    for leaf, want, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(plain),
                                jax.tree.leaves(sharding.param_shardings(config, mesh_b))):
        assert leaf.sharding.is_equivalent_to(spec, leaf.ndim)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))
    tokens = np.load(fixture / "reference.npz")["tokens"]
    np.testing.assert_allclose(np.asarray(mj.logits(config, restored, tokens, mesh=mesh_b)),
                               np.asarray(mj.logits(config, plain, tokens)), rtol=1e-5, atol=1e-5)
