"""Multi-LoRA serving in the engine (no HTTP): each request on its adapter equals mj.generate on that adapter merged
(lora.merge), token for token, whatever shares the batch; more adapters than --max-loras slots swap in and out (LRU)
without a compilation; adapters for another base are refused at start-up."""

import jax
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import lora
from mistral_jax.checkpoints import peft
from mistral_jax.compile_stats import CompileStats
from mistral_jax.serving.adapters import Adapters, parse_modules
from mistral_jax.serving.engine import Engine
from mistral_jax.serving.paged_engine import PagedEngine
from mistral_jax.serving.requests import ModelNotFound, SamplingParams

RANKS = {"ada": 2, "bob": 4, "cat": 8, "dan": 4}  # "cat" also adapts the MLP
PROMPT_LENGTHS = [3, 20, 7, 11, 5, 33, 2, 17]
MAX_TOKENS = [6, 9, 12, 5, 8, 10, 7, 4]


def random_adapter(config, params, seed: int, rank: int, targets=("wq", "wk", "wv", "wo")) -> lora.Adapter:
    """An adapter whose B is not zero (a fresh one changes nothing): factors N(0, 0.1^2), drawn by NumPy into
    lora.init's shapes (abstract: jax's per-shape random programs compiled 37 times for three Mixtral adapters)."""
    spec = lora.LoraSpec(rank, 2.0 * rank, targets)
    shapes = jax.eval_shape(lambda: lora.init(params, spec, jax.random.key(seed)))
    rng = np.random.default_rng(seed + 100)
    weights = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.1).astype(np.float32), shapes)
    return lora.Adapter(weights, spec.scale, f"adapter {seed}")


def write_adapters(config, params, directory) -> dict[str, str]:
    """PEFT directories of RANKS' adapters: {name: path}."""
    paths = {}
    for seed, (name, rank) in enumerate(RANKS.items()):
        targets = lora.TARGETS if name == "cat" else ("wq", "wk", "wv", "wo")
        adapter = random_adapter(config, params, seed, rank, tuple(targets))
        paths[name] = str(peft.write(config, adapter, directory / name, base_model="tiny-mistral"))
    return paths


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = mj.ModelConfig.from_preset("tiny-mistral")
    params = mj.init_params(config, jax.random.key(0))
    paths = write_adapters(config, params, tmp_path_factory.mktemp("adapters"))
    adapters = Adapters(config, paths, max_loras=2, max_lora_rank=8)
    engine = Engine(config, params, max_batch=8, max_seq_len=96, prefill_chunk=16, adapters=adapters).start()
    yield engine, config, params, paths
    engine.stop()


def _expected(config, params, paths, name, prompt, max_tokens):
    if name is None:
        return mj.generate(config, params, [prompt], max_tokens)[0]
    adapter = mj.load_adapter(paths[name], config)
    return mj.generate(config, lora.merge(params, adapter.weights, adapter.scale), [prompt], max_tokens)[0]


@pytest.mark.parametrize("names", [("ada", "bob", "cat", None), ("dan", "cat", "ada", "bob", None)])
def test_each_request_equals_generate_on_its_merged_adapter_without_compiling(served, names):
    engine, config, params, paths = served
    rng = np.random.default_rng(len(names))
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    picks = [names[i % len(names)] for i in range(len(prompts))]  # 8 at once over 3 (then 4) adapters and the base
    with CompileStats() as compiled:
        requests = [engine.submit(p, SamplingParams(max_tokens=m), adapter=a)
                    for p, m, a in zip(prompts, MAX_TOKENS, picks)]
        got = [[t for event in r for t in event.token_ids] for r in requests]
    assert compiled.compilations == 0  # adapters coming, going and swapping slots compile nothing
    expected = [_expected(config, params, paths, a, p, m) for p, m, a in zip(prompts, MAX_TOKENS, picks)]
    assert got == expected
    base = [mj.generate(config, params, [p], m)[0] for p, m in zip(prompts, MAX_TOKENS)]
    assert all(g != b for g, b, a in zip(got, base, picks) if a is not None)  # each adapter changes its tokens
    assert engine.active_slots == 0 and not engine.busy


def test_unknown_adapter_and_another_base_are_refused(served, tmp_path):
    engine, config, params, paths = served
    with pytest.raises(ModelNotFound, match="`nobody` does not exist"):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=2), adapter="nobody")
    other = mj.ModelConfig.from_preset("tiny-mistral").replace(dim=48)
    with pytest.raises(mj.UserError) as err:
        Adapters(other, {"ada": paths["ada"]})
    assert "\n" not in str(err.value) and "[32, 32]" not in str(err.value)
    with pytest.raises(mj.UserError, match="rank r=8 is above max_lora_rank=4"):
        Adapters(config, {"cat": paths["cat"]}, max_lora_rank=4)
    with pytest.raises(mj.UserError, match="--lora-modules: 'ada' is not NAME=PATH"):
        parse_modules(["ada"])


def test_paged_engine_serves_adapters_per_token(served):
    _, config, params, paths = served
    adapters = Adapters(config, paths, max_loras=4, max_lora_rank=8)
    # Pages of 16: one page-count bucket (5 programs to warm up rather than 10 with pages of 8).
    engine = PagedEngine(config, params, page_size=16, max_total_tokens=512, max_num_batched_tokens=32, max_batch=4,
                         max_seq_len=96, adapters=adapters).start()
    try:
        rng = np.random.default_rng(7)
        prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
        prompts[5] = prompts[1][:17]  # a full page of another request's prompt (and one token), on another adapter
        picks = ["ada", "bob", "cat", None, "dan", "ada", "cat", None]
        with CompileStats() as compiled:
            requests = [engine.submit(p, SamplingParams(max_tokens=m), adapter=a)
                        for p, m, a in zip(prompts, MAX_TOKENS, picks)]
            got = [[t for event in r for t in event.token_ids] for r in requests]
        assert compiled.compilations == 0
        assert got == [_expected(config, params, paths, a, p, m) for p, m, a in zip(prompts, MAX_TOKENS, picks)]
    finally:
        engine.stop()
    with pytest.raises(mj.UserError, match=r"--max-loras \(2\) at least --max-batch \(4\)"):
        PagedEngine(config, params, max_batch=4, adapters=Adapters(config, {}, max_loras=2), warm_up=False)


MIXTRAL_ADAPTERS = {"gates": (2, ("w_gate", "w_up")), "downs": (4, ("wq", "w_down")), "every": (8, lora.TARGETS)}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """Tiny Mixtral and PEFT directories of adapters on its expert weights (and attention)."""
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    params = mj.init_params(config, jax.random.key(0))
    directory = tmp_path_factory.mktemp("mixtral-adapters")
    paths = {name: str(peft.write(config, random_adapter(config, params, 20 + seed, rank, tuple(targets)),
                                  directory / name, base_model="tiny-mixtral"))
             for seed, (name, (rank, targets)) in enumerate(MIXTRAL_ADAPTERS.items())}
    return config, params, paths


@pytest.mark.parametrize("paged", [False, True], ids=["slots", "paged"])
def test_mixture_of_experts_serves_adapters_on_expert_weights(mixtral, paged):
    config, params, paths = mixtral
    if paged:  # each token of the flat row picks its slot
        adapters = Adapters(config, paths, max_loras=4, max_lora_rank=8)
        engine = PagedEngine(config, params, page_size=16, max_total_tokens=512, max_num_batched_tokens=32,
                             max_batch=4, max_seq_len=64, adapters=adapters)  # one page bucket: 5 programs
    else:  # two slots for three adapters: they swap in and out
        adapters = Adapters(config, paths, max_loras=2, max_lora_rank=8)
        engine = Engine(config, params, max_batch=4, max_seq_len=64, prefill_chunk=16, adapters=adapters)
    engine.start()
    try:
        rng = np.random.default_rng(11)
        prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS[:6]]
        picks = ["gates", "downs", "every", None, "every", "gates"]
        with CompileStats() as compiled:
            requests = [engine.submit(p, SamplingParams(max_tokens=m), adapter=a)
                        for p, m, a in zip(prompts, MAX_TOKENS, picks)]
            got = [[t for event in r for t in event.token_ids] for r in requests]
        assert compiled.compilations == 0  # adapters coming, going and swapping compile nothing
    finally:
        engine.stop()
    assert got == [_expected(config, params, paths, a, p, m) for p, m, a in zip(prompts, MAX_TOKENS, picks)]
    base = [mj.generate(config, params, [p], m)[0] for p, m in zip(prompts, MAX_TOKENS)]
    assert all(g != b for g, b, a in zip(got, base, picks) if a is not None)  # each adapter changes its tokens
