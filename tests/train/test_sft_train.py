"""train.loop and mistral_jax.lora: memorising, compiling once, sharded = unsharded, LoRA trains adapters only,
NaN stop, metrics of a resumed run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import lora, sharding
from mistral_jax.compile_stats import CompileStats
from train.data import load_data
from train.loop import BatchShape, DivergedError, LoopOptions, Trainer, checkpoint_manager, run_loop
from train.optim import OptimConfig


def _data(tokenizer, data_file, rows, seq_len=64, packing=True):
    return load_data(data_file, tokenizer, seq_len=seq_len, rows=rows, packing=packing, seed=0, eval_fraction=0,
                     vocab_size=256)


def _step_metrics(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _llama_trainer() -> tuple[mj.ModelConfig, Trainer]:
    """Tiny Llama, 2 rows of 64 tokens a step: the same program each time (the compilation cache reuses it)."""
    config = mj.ModelConfig.from_preset("tiny-llama")
    return config, Trainer(config, OptimConfig(3e-3, total_steps=40, warmup_steps=2), BatchShape(1, 2, 64))


def test_tiny_model_memorises_and_the_step_compiles_once(tokenizer, data_file) -> None:
    config, trainer = _llama_trainer()
    state = trainer.init_state(mj.init_params(config, jax.random.key(0)))
    data = _data(tokenizer, data_file, rows=2)
    state, metrics = trainer.train_step(state, trainer.put_batch(next(data.train)))
    losses = [_step_metrics(metrics)["loss"]]
    # After the first step no step may compile again. Lowerings count too: with the persistent
    # compilation cache on, a recompilation may skip the backend compiler.
    with CompileStats() as compiled:
        for _ in range(39):
            state, metrics = trainer.train_step(state, trainer.put_batch(next(data.train)))
            losses.append(_step_metrics(metrics)["loss"])
    assert compiled.compilations == compiled.lowerings == 0
    assert int(state.step) == 40
    assert np.mean(losses[-4:]) < 0.2 * np.mean(losses[:2]), losses


def test_sharded_step_equals_unsharded(tokenizer, data_file) -> None:
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    params = mj.init_params(config, jax.random.key(1))
    # Adam's eps 1e-6, not 1e-8: with 1e-8 Adam divides a near-zero gradient by its own size, so rounding in
    # a cancelling sum (other reduction orders on the mesh) moved one w_down element of 65536 by 3.1e-5 with
    # the packages installed on 2026-12-01 (the landed commit too); with 1e-6 the worst was 1.6e-6. A real
    # sharding mistake (a missing reduction, a wrong split) moves weights by the order of the learning rate.
    optim = OptimConfig(1e-3, total_steps=10, warmup_steps=1, eps=1e-6)
    shape = BatchShape(1, 4, 32)
    batches = [next(_data(tokenizer, data_file, rows=4, seq_len=32).train) for _ in range(2)]
    mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    results = []
    for m in (None, mesh):
        trainer = Trainer(config, optim, shape, aux_loss_coef=0.02, mesh=m)
        state = trainer.init_state(jax.tree.map(jnp.array, params))
        for batch in batches:
            state, metrics = trainer.train_step(state, trainer.put_batch(batch))
        results.append((state, _step_metrics(metrics)))
    (plain, m1), (sharded, m2) = results
    w_up = sharded.trainable["layers"]["moe"]["w_up"]
    assert w_up.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    mu = sharded.opt_state[1][0].mu["layers"]["moe"]["w_up"]
    assert mu.sharding.is_equivalent_to(w_up.sharding, w_up.ndim)  # the Adam moments are split like the weights
    assert m1["aux_loss"] > 0
    for key in ("loss", "aux_loss", "grad_norm"):
        np.testing.assert_allclose(m1[key], m2[key], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), jax.device_get(plain.trainable),
                 jax.device_get(sharded.trainable))


def test_lora_trains_only_the_adapters(tokenizer, data_file) -> None:
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    params = mj.init_params(config, jax.random.key(2))
    base = jax.device_get(params)
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("wq", "wo", "w_gate", "w_down"))
    trainer = Trainer(config, OptimConfig(1e-2, total_steps=5, warmup_steps=1), BatchShape(1, 2, 64), lora=spec)
    state = trainer.init_state(params, lora.init(params, spec, jax.random.key(3)))
    # The moments of the adapters only.
    assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(state.trainable)
    data = _data(tokenizer, data_file, rows=2)
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.put_batch(next(data.train)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), base, jax.device_get(state.base))
    adapters = jax.device_get(state.trainable)
    assert adapters["layers"]["moe"]["w_gate"]["a"].shape == (2, 4, 64, 4)  # per layer and expert
    assert adapters["layers"]["moe"]["w_gate"]["b"].shape == (2, 4, 4, 128)
    assert all(np.abs(ab["b"]).max() > 0 for module in adapters["layers"].values() for ab in module.values())
    merged = lora.merge(base, adapters, spec.scale)
    products = {"wo": "lhkr,lrd->lhkd", "w_gate": "ledr,lerf->ledf"}  # [L, H, hd, D] and [L, E, D, F]
    for name, equation in products.items():
        module = "attention" if name == "wo" else "moe"
        ab = adapters["layers"][module][name]
        expected = base["layers"][module][name] + 2.0 * np.einsum(equation, ab["a"], ab["b"])
        np.testing.assert_allclose(merged["layers"][module][name], expected, atol=1e-6)
    assert (merged["layers"]["attention"]["wk"] == base["layers"]["attention"]["wk"]).all()  # not a target
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        lora.LoraSpec(4, 8.0, ("wq", "router"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer, data_file) -> None:
    config, trainer = _llama_trainer()
    state = trainer.init_state(mj.init_params(config, jax.random.key(0)))
    manager = checkpoint_manager(tmp_path, keep=3)
    batches = _data(tokenizer, data_file, rows=2).train
    options = LoopOptions(tmp_path, 40, stop_at=2, save_every=1, log_every=1)
    state, result = run_loop(trainer, state, batches, manager, options)
    assert result.status == "stopped" and manager.all_steps() == [1, 2]
    poisoned = state.replace(trainable={**state.trainable, "lm_head": state.trainable["lm_head"] * np.nan})
    with pytest.raises(DivergedError, match=r"step 3: loss nan.*last good checkpoint is step 2"):
        run_loop(trainer, poisoned, batches, manager, LoopOptions(tmp_path, 40, save_every=1, log_every=1))
    assert manager.all_steps() == [1, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resumed_loop_drops_the_metrics_of_steps_after_its_checkpoint(tmp_path, tokenizer, data_file) -> None:
    """A run killed after logging steps 3 and 4 but before saving them resumes from step 2: each step logged once."""
    config, trainer = _llama_trainer()
    state = trainer.init_state(mj.init_params(config, jax.random.key(0)))
    manager = checkpoint_manager(tmp_path, keep=3)
    batches = _data(tokenizer, data_file, rows=2).train
    state, _ = run_loop(trainer, state, batches, manager, LoopOptions(tmp_path, 40, stop_at=2, log_every=1))
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as file:  # what the killed run wrote after its checkpoint, the last line cut off
        file.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0}) + "\n{\"st")
    run_loop(trainer, state, batches, manager, LoopOptions(tmp_path, 40, stop_at=4, log_every=1))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads(metrics.read_text().splitlines()[2])["loss"] != 1.0
