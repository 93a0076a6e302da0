"""train.optim and the loss: schedule, decay mask, assistant-only loss, packing isolation, exact accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from train.data import load_data, make_rows
from train.loop import BatchShape, Trainer
from train.optim import OptimConfig, decay_mask, learning_rate_schedule, token_loss_sum

CONFIG = mj.ModelConfig.from_preset("tiny-llama")
forward = jax.jit(mj.forward, static_argnums=0)


@pytest.fixture(scope="module")
def params():
    return mj.init_params(CONFIG, jax.random.key(0))


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    schedule = learning_rate_schedule(OptimConfig(1e-3, total_steps=100, warmup_steps=10, min_lr_ratio=0.1))
    lrs = np.array([float(schedule(i)) for i in range(100)])
    np.testing.assert_allclose(lrs[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-6)  # the first update moves already
    assert (np.diff(lrs[9:]) < 0).all()
    np.testing.assert_allclose(lrs[-1], 1e-4, rtol=1e-6)
    with pytest.raises(ValueError, match="warmup"):
        OptimConfig(1e-3, total_steps=5, warmup_steps=6)


def test_no_weight_decay_on_norm_scales(params) -> None:
    mask = decay_mask(params)
    assert not mask["final_norm"]["scale"] and not mask["layers"]["attention_norm"]["scale"]
    assert mask["embedding"] and mask["layers"]["attention"]["wq"] and mask["layers"]["mlp"]["w_down"]


def _loss(params, rows):
    logits = forward(CONFIG, params, rows["inputs"], rows["positions"], rows["segment_ids"]).logits
    total, count = token_loss_sum(logits, rows["targets"], rows["weights"])
    return float(total / count)


def test_only_assistant_targets_count(params, tokenizer, data_file) -> None:
    data = load_data(data_file, tokenizer, seq_len=64, rows=2, packing=True, seed=0, eval_fraction=0, vocab_size=256)
    rows = next(data.train)
    base = _loss(params, rows)
    context = np.argwhere((rows["weights"] == 0) & (rows["positions"] >= 0))[5]  # a system / user target
    answer = np.argwhere(rows["weights"] == 1)[3]
    for (r, t), changes in ((context, False), (answer, True)):
        edited = {**rows, "targets": rows["targets"].copy()}
        edited["targets"][r, t] = (edited["targets"][r, t] + 7) % tokenizer.vocab_size
        assert (_loss(params, edited) != base) == changes


def test_packed_row_logits_equal_each_example_alone(params, tokenizer, data_file) -> None:
    data = load_data(data_file, tokenizer, seq_len=128, rows=1, packing=True, seed=0, eval_fraction=0, vocab_size=256)
    examples = [data.train.streams[0].examples[i] for i in range(3)]
    packed = make_rows(examples, 128, packing=True)
    assert packed["inputs"].shape[0] == 1 and packed["segment_ids"].max() == 3
    logits = forward(CONFIG, params, packed["inputs"], packed["positions"], packed["segment_ids"]).logits
    alone = make_rows(examples, 128, packing=False)  # one example a row, padding after it
    alone_logits = forward(CONFIG, params, alone["inputs"], alone["positions"], None).logits
    offset = 0
    for i, example in enumerate(examples):
        n = len(example)
        np.testing.assert_allclose(logits[0, offset:offset + n], alone_logits[i, :n], atol=1e-5)
        offset += n


def _accumulated_and_whole(config, params, tokenizer, data_file, aux_loss_coef=0.0, steps=2, adam_eps=1e-8):
    """`steps` steps of 2 micro-batches of 2 rows, and of one batch of the same 4 rows -> [(params, metrics, rows)]."""
    optim = OptimConfig(1e-3, total_steps=10, warmup_steps=1, eps=adam_eps)
    results = []
    for accum, rows in ((2, 2), (1, 4)):
        data = load_data(data_file, tokenizer, seq_len=32, rows=rows, micro_batches=accum, packing=False, seed=0,
                         eval_fraction=0, vocab_size=256)
        trainer = Trainer(config, optim, BatchShape(accum, rows, 32), aux_loss_coef=aux_loss_coef)
        state = trainer.init_state(jax.tree.map(jnp.array, params))
        for _ in range(steps):
            batch = next(data.train)
            state, metrics = trainer.train_step(state, trainer.put_batch(batch))
        results.append((jax.device_get(state.trainable), {k: float(v) for k, v in metrics.items()}, batch))
    (p1, m1, _), (p2, m2, _) = results
    assert m1["target_tokens"] == m2["target_tokens"] > 0
    for key in ("loss", "grad_norm", "aux_loss"):
        np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p2)
    return results


def test_gradient_accumulation_equals_one_big_batch(params, tokenizer, data_file) -> None:
    """2 micro-batches of 2 rows equal one batch of 4 rows: the same rows, token-weighted."""
    _accumulated_and_whole(CONFIG, params, tokenizer, data_file)


def test_moe_accumulation_balances_over_the_whole_batch(tokenizer, data_file) -> None:
    """With the load-balancing loss in the objective (coefficient 1), 2 micro-batches still equal one batch:
    its f_e and P_e are the whole batch's, which the mean of the micro-batches' own losses is not. One step, and an
    Adam eps far above rounding noise: otherwise Adam's g / sqrt(v) turns the rounding of a near-zero gradient
    entry into a move of up to the learning rate (1 of 65536 weights moved 1.6e-5 with eps 1e-8)."""
    config = mj.ModelConfig.from_preset("tiny-mixtral").replace(n_layers=1)  # one layer: half the compile time
    moe_params = mj.init_params(config, jax.random.key(0))
    results = _accumulated_and_whole(config, moe_params, tokenizer, data_file, aux_loss_coef=1.0, steps=1,
                                     adam_eps=1e-3)
    final, metrics, rows = jax.tree.map(jnp.asarray, results[0][0]), results[0][1], results[0][2]
    whole = float(forward(config, final, rows["inputs"], rows["positions"], None).aux["load_balancing_loss"])
    halves = [float(forward(config, final, rows["inputs"][i:i + 2], rows["positions"][i:i + 2], None)
                    .aux["load_balancing_loss"]) for i in (0, 2)]
    assert abs(whole - np.mean(halves)) > 1e-3, (whole, halves)  # per-micro-batch losses would not have matched
    assert metrics["aux_loss"] > 0
