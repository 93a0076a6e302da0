"""The memory planner: abstract-mesh numbers equal what shard_params really places."""

import json

import jax
import pytest

import mistral_jax as mj
from mistral_jax import cli, planner
from mistral_jax.model import quant


@pytest.mark.parametrize("preset, mesh", [("tiny-mixtral", dict(data=1, fsdp=2, expert=2, tensor=2)),
                                          ("tiny-mistral", dict(data=1, fsdp=8, expert=1, tensor=1)),
                                          ("tiny-llama", dict(data=2, fsdp=1, expert=1, tensor=4))])
def test_planned_param_bytes_match_the_placed_ones(preset, mesh):
    config = mj.ModelConfig.from_preset(preset)
    planned = planner.plan(config, mesh, dtype="float32").params_bytes_per_device
    params = mj.shard_params(config, mj.init_params(config, jax.random.key(0)), mj.make_mesh(**mesh))
    device0 = jax.devices()[0]
    placed = sum(shard.data.nbytes for leaf in jax.tree.leaves(params) for shard in leaf.addressable_shards
                 if shard.device == device0)
    assert planned == pytest.approx(placed, rel=0.05)


def test_training_adds_master_weights_moments_and_gradients():
    config = mj.ModelConfig.from_preset("mistral-7b-v0.1")
    mesh = dict(data=1, fsdp=8, expert=1, tensor=1)
    infer = planner.plan(config, mesh, dtype="bfloat16", batch=8, seq_len=4096)
    train = planner.plan(config, mesh, dtype="bfloat16", batch=8, seq_len=2048, train=True)
    assert train.params_bytes_per_device == 2 * infer.params_bytes_per_device  # float32 master weights
    assert train.optimizer_bytes_per_device == 2 * train.params_bytes_per_device
    assert infer.kv_cache_bytes_per_device == 32 * 8 * 4096 * 8 * 128 * 2 * 2 // 8  # window 4096, batch over fsdp
    lora = planner.plan(config, mesh, dtype="bfloat16", batch=8, seq_len=2048, train=True, lora_rank=16)
    assert lora.optimizer_bytes_per_device < train.optimizer_bytes_per_device / 100
    assert not train.fits["TPU v5e"] and train.fits["TPU v5p"]


def test_cli_plan_json(capsys):
    """Mixtral 8x7B in bfloat16 at 32k tokens: 128 KiB of K and V per token, 4 GiB per sequence."""
    assert cli.main(["plan", "--preset", "mixtral-8x7b-v0.1", "--mesh", "fsdp=4,expert=2", "--json",
                     "--seq-len", "32768", "--attention", "flash"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total_params"] == mj.ModelConfig.from_preset("mixtral-8x7b-v0.1").param_counts()["total"]
    assert {"params_bytes_per_device", "kv_cache_bytes_per_device", "fits", "total_bytes_per_device"} <= set(result)
    assert (result["attention"], result["kv_bytes_per_token"], result["kv_bytes_per_sequence"]) == (
        "flash", 128 * 1024, 4 * planner.GIB)
    assert result["kv_cache_bytes_per_device"] == 4 * planner.GIB  # one row: the batch cannot split


def test_long_context_training_memory_is_linear_with_a_blockwise_kernel():
    """Training activations from 8k to 32k tokens: 4x with flash, about 16x with the exact kernel's scores; the
    default takes the exact kernel for short sequences; a window bounds the cache of a sequence."""
    mesh = dict(data=1, fsdp=8, expert=1, tensor=1)
    config = mj.ModelConfig.from_preset("mistral-7b-v0.2")

    def activations(kind, seq_len):
        p = planner.plan(config.replace(attention=kind), mesh, seq_len=seq_len, train=True, remat=False)
        return p.activation_bytes_per_device

    assert activations("flash", 32768) == pytest.approx(4 * activations("flash", 8192), rel=1e-3)
    assert activations("xla", 32768) > 10 * activations("xla", 8192)
    assert planner.plan(config, mesh, seq_len=4096).attention == "xla"
    assert planner.plan(config, mesh, seq_len=32768).attention != "xla"
    window = planner.plan(mj.ModelConfig.from_preset("mistral-7b-v0.1"), mesh, seq_len=32768)
    assert window.kv_bytes_per_sequence == 4096 * window.kv_bytes_per_token


def test_recommended_mesh_fits_and_uses_every_device():
    config = mj.ModelConfig.from_preset("mixtral-8x7b-v0.1")
    best = planner.recommend(config, 32, dtype="bfloat16", batch=32, seq_len=2048, train=True)
    assert best.mesh["data"] * best.mesh["fsdp"] * best.mesh["expert"] * best.mesh["tensor"] == 32
    every = [planner.plan(config, m, dtype="bfloat16", batch=32, seq_len=2048, train=True)
             for m in planner.candidate_meshes(config, 32)]
    assert best.total_bytes_per_device <= 1.05 * min(p.total_bytes_per_device for p in every)
    assert best.fits["TPU v5p"]


def test_quantized_plans_count_int8_weights_scales_and_cache():
    """int8 weights plan as placed (int8 values, float32 scales); an int8 cache costs 1 byte + a float32 scale per
    head_dim values; training a quantized config and an unknown mode are refused with one line."""
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    mesh = dict(data=1, fsdp=2, expert=2, tensor=2)
    qconfig, qparams = mj.quantize(config, mj.init_params(config, jax.random.key(0)))
    planned = planner.plan(qconfig, mesh, dtype="float32").params_bytes_per_device
    placed = mj.shard_params(qconfig, qparams, mj.make_mesh(**mesh))
    device0 = jax.devices()[0]
    assert planned == pytest.approx(sum(s.data.nbytes for leaf in jax.tree.leaves(placed)
                                        for s in leaf.addressable_shards if s.device == device0), rel=0.05)
    mistral = mj.ModelConfig.from_preset("mistral-7b-v0.1")
    one = dict(data=1, fsdp=1, expert=1, tensor=1)
    bf16 = planner.plan(mistral, one, seq_len=4096)
    int8 = planner.plan(mistral.replace(quant="int8", kv_cache_dtype="int8"), one, seq_len=4096)
    assert int8.total_params == bf16.total_params
    assert int8.params_bytes_per_device == pytest.approx(bf16.params_bytes_per_device / 2, rel=0.01)
    assert int8.kv_bytes_per_token == 2 * 32 * 8 * (128 + 4)  # int8 values and a float32 scale per token and head
    assert int8.kv_cache_bytes_per_device == 4096 * int8.kv_bytes_per_token
    with pytest.raises(mj.UserError, match="quantized"):
        planner.plan(mistral.replace(quant="int8"), one, train=True)
    assert cli.main(["plan", "--preset", "tiny-llama", "--devices", "1", "--quantize", "int4"]) == 2


def test_dpo_counts_the_reference_copy_and_two_rows_a_pair(capsys):
    """Full fine-tune DPO holds a frozen float32 reference copy split like the master weights; with LoRA the
    reference is the base (nothing added). --batch counts pairs: the activations of twice the rows."""
    config = mj.ModelConfig.from_preset("mistral-7b-v0.1")
    mesh = dict(data=1, fsdp=8, expert=1, tensor=1)
    sft = planner.plan(config, mesh, batch=8, seq_len=2048, train=True)
    dpo = planner.plan(config, mesh, batch=8, seq_len=2048, train=True, dpo=True)
    assert dpo.reference_bytes_per_device == dpo.params_bytes_per_device == sft.params_bytes_per_device
    assert dpo.activation_bytes_per_device == planner.plan(config, mesh, batch=16, seq_len=2048,
                                                           train=True).activation_bytes_per_device
    assert dpo.total_bytes_per_device - sft.total_bytes_per_device == (
        dpo.reference_bytes_per_device + dpo.activation_bytes_per_device - sft.activation_bytes_per_device)
    lora = planner.plan(config, mesh, batch=8, seq_len=2048, train=True, lora_rank=16, dpo=True)
    assert lora.reference_bytes_per_device == 0
    with pytest.raises(ValueError, match="pass train"):
        planner.plan(config, mesh, dpo=True)
    assert cli.main(["plan", "--preset", "mistral-7b-v0.1", "--mesh", "fsdp=8", "--train", "--dpo", "--batch", "8",
                     "--seq-len", "2048"]) == 0
    assert "DPO reference copy           3.37 GiB per device" in capsys.readouterr().out


def test_mixtral_8x22b_and_nemo_plans():
    """int8 weights halve the bfloat16 weights per chip (scales aside); full SFT of 8x22B needs 64 v5p chips."""
    mixtral = mj.ModelConfig.from_preset("mixtral-8x22b-v0.1")
    mesh = dict(data=1, fsdp=2, expert=1, tensor=8)
    bf16 = planner.plan(mixtral, mesh, batch=8, seq_len=4096)
    int8 = planner.plan(quant.quantized_config(mixtral, "int8"), mesh, batch=8, seq_len=4096)
    assert bf16.total_params == 140_620_634_112 and bf16.active_params == 39_152_031_744
    assert int8.params_bytes_per_device == pytest.approx(bf16.params_bytes_per_device / 2, rel=0.02)
    assert not planner.recommend(mixtral, 16, batch=32, seq_len=2048, train=True).fits["TPU v5p"]
    assert planner.recommend(mixtral, 64, batch=32, seq_len=2048, train=True).fits["TPU v5p"]
    nemo = mj.ModelConfig.from_preset("mistral-nemo-12b-base-2407")
    lora = planner.recommend(nemo, 8, batch=32, seq_len=2048, train=True, lora_rank=16)
    assert lora.total_params == 12_247_782_400 and lora.fits["TPU v6e"]
