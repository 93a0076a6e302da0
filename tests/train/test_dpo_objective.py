"""DPO's first step equals TRL's formulas computed with transformers (tiny random Mistral and Mixtral, golden values
in tests/fixtures/dpo made by tests/fixtures/make_dpo_fixtures.py; recomputed live where transformers is installed),
and gradient accumulation over pairs (with Mixtral's load-balancing loss) equals one big batch."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import lora
from mistral_jax.compile_stats import CompileStats
from train.loop import BatchShape, Trainer
from train.objectives import PAIR_METRICS, Dpo
from train.optim import OptimConfig
from train.pairs import pair_rows

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CASES = ("mistral_gqa_window", "mixtral_top2")
SEQ_LEN = 12  # every fixture pair's prompt + response fits: at most 6 + 6 tokens
# float32 on both sides; the sums of ~5 log-probs of ~-5 each and the differences of policy and reference agree
# to ~1e-6 relative. A wrong mask (a prompt token counted), a missing shift or the reference's adapters left on
# move them by far more than this.
RTOL, ATOL = 2e-5, 2e-5


def _golden(case: str) -> dict:
    return dict(np.load(FIXTURES / "dpo" / f"{case}.npz"))


def _pairs(golden: dict) -> list[tuple[list[int], list[int], list[int]]]:
    parts = ("prompt", "chosen", "rejected")
    return [tuple(golden[p][i, : golden[f"{p}_lengths"][i]].tolist() for p in parts) for i in range(4)]


def _rows(pairs) -> dict[str, np.ndarray]:
    """The pairs as the data pipeline lays them out: [chosen 0, rejected 0, chosen 1, ...]."""
    rows = [pair_rows(*pair, SEQ_LEN)[0] for pair in pairs]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _adapters(golden: dict) -> dict:
    weights = {name: {part: jnp.asarray(golden[f"{name}_{part}"]) for part in ("a", "b")} for name in ("wv", "wo")}
    return {"layers": {"attention": weights}}


def _first_step(case: str, loss_type: str) -> dict[str, float]:
    golden = _golden(case)
    config, params = mj.load(FIXTURES / "hf" / case, "float32")
    spec = lora.LoraSpec(int(golden["rank"]), float(golden["alpha"]), ("wv", "wo"))
    trainer = Trainer(config, OptimConfig(1e-3, total_steps=10, warmup_steps=1), BatchShape(1, 8, SEQ_LEN), lora=spec,
                      objective=Dpo(float(golden["beta"]), loss_type))
    state = trainer.init_state(params, _adapters(golden))
    _, metrics = trainer.train_step(state, trainer.put_batch(_rows(_pairs(golden))))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.fixture(scope="module")
def first_steps() -> dict[tuple[str, str], dict[str, float]]:
    return {(case, kind): _first_step(case, kind) for case in CASES for kind in ("sigmoid", "ipo")}


@pytest.mark.parametrize("case", CASES)
def test_first_step_equals_trl_formulas_on_transformers(first_steps, case) -> None:
    golden = _golden(case)
    for kind in ("sigmoid", "ipo"):
        got = first_steps[case, kind]
        for metric in PAIR_METRICS:
            np.testing.assert_allclose(got[metric], golden[f"{kind}:{metric}"], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{case} {kind} {metric}")
        assert got["target_tokens"] == sum(len(c) + len(r) for _, c, r in _pairs(golden))
        assert got["grad_norm"] > 0
    assert first_steps[case, "sigmoid"]["loss"] != pytest.approx(np.log(2), abs=1e-3)  # the policy is not the reference


@pytest.mark.parametrize("case", CASES)
def test_first_step_equals_live_transformers(first_steps, case) -> None:
    """The twin of the golden test against transformers itself, where it is installed."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("make_dpo_fixtures", FIXTURES / "make_dpo_fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    golden = _golden(case)
    expected = script.reference(FIXTURES / "hf" / case, golden)
    for kind, values in expected.items():
        for metric, value in values.items():
            np.testing.assert_allclose(first_steps[case, kind][metric], value, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{case} {kind} {metric}")


def test_accumulated_pairs_equal_one_batch_with_the_load_balancing_loss() -> None:
    """2 micro-batches of 2 pairs = 1 batch of 4 pairs (the loss is a pair mean), Mixtral's aux loss included; the
    step compiles once."""
    golden = _golden("mixtral_top2")
    config, params = mj.load(FIXTURES / "hf" / "mixtral_top2", "float32")
    rows = _rows(_pairs(golden))
    results = []
    for accum in (2, 1):
        trainer = Trainer(config, OptimConfig(1e-3, total_steps=10, warmup_steps=1, eps=1e-3),
                          BatchShape(accum, 8 // accum, SEQ_LEN), aux_loss_coef=1.0, objective=Dpo(0.1))
        state = trainer.init_state(jax.tree.map(jnp.array, params))
        state, metrics = trainer.train_step(state, trainer.put_batch(rows))
        with CompileStats() as compiled:  # the second step's policy differs from the reference; no new program
            state, metrics = trainer.train_step(state, trainer.put_batch(rows))
        assert compiled.compilations == compiled.lowerings == 0
        results.append((jax.device_get(state.trainable), {k: float(v) for k, v in jax.device_get(metrics).items()}))
    (p1, m1), (p2, m2) = results
    assert m1["aux_loss"] > 0 and m1["loss"] != pytest.approx(np.log(2), abs=1e-4)
    for key in (*PAIR_METRICS, "aux_loss", "grad_norm"):
        np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p2)
