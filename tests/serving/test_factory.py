"""serving/factory.make_engine: paged by default; the slot engine with page_size 0, or where the paged engine cannot
serve yet, then with one logged line saying why (engines built without warm-up: nothing compiles here)."""

import logging

import jax
import pytest

import mistral_jax as mj
from mistral_jax import speculative
from mistral_jax.serving.engine import Engine
from mistral_jax.serving.factory import make_engine
from mistral_jax.serving.paged_engine import DEFAULT_PAGE_SIZE, PagedEngine
from mistral_jax.serving.requests import RequestError, SamplingParams


@pytest.fixture(scope="module")
def tiny():
    config = mj.ModelConfig.from_preset("tiny-llama")
    return mj.unstack_layers(config, mj.init_params(config, jax.random.key(0)))


def test_paged_by_default_slots_with_page_size_zero(tiny, caplog):
    config, params = tiny
    with caplog.at_level(logging.WARNING, logger="mistral_jax.serving.factory"):
        paged = make_engine(config, params, max_batch=2, max_seq_len=64, warm_up=False)
        slots = make_engine(config, params, page_size=0, max_batch=2, max_seq_len=64, warm_up=False)
    assert type(paged) is PagedEngine and paged.page_size == DEFAULT_PAGE_SIZE == 16
    assert type(slots) is Engine
    assert not caplog.records  # asked for: nothing to explain


@pytest.mark.parametrize("case", ["speculation", "int8 kv"])
def test_what_pages_cannot_serve_falls_back_to_slots_in_one_line(tiny, caplog, case):
    config, params = tiny
    speculation = speculative.Speculation(draft_tokens=2) if case == "speculation" else None
    if case == "int8 kv":
        config = config.replace(kv_cache_dtype="int8")
    with caplog.at_level(logging.WARNING, logger="mistral_jax.serving.factory"):
        engine = make_engine(config, params, max_batch=2, max_seq_len=64, speculation=speculation, warm_up=False)
    assert type(engine) is Engine
    assert len(caplog.records) == 1
    assert {"speculation": "speculative", "int8 kv": "int8"}[case] in caplog.text
    if speculation is None:  # asked for outright, the paged engine refuses and says how to serve it
        with pytest.raises(mj.UserError, match="--page-size 0"):
            PagedEngine(config, params, max_batch=2, max_seq_len=64, warm_up=False)


def test_refusals_name_the_fields_the_slot_engine_names(tiny):
    """Past the context: max_tokens (as the slot engine says); within it but past the pool: prompt."""
    config, params = tiny
    paged = make_engine(config, params, max_batch=2, max_seq_len=64, max_total_tokens=32, page_size=4, warm_up=False)
    slots = make_engine(config, params, page_size=0, max_batch=2, max_seq_len=64, warm_up=False)
    for engine in (paged, slots):
        with pytest.raises(RequestError) as err:
            engine.submit(list(range(60)), SamplingParams(max_tokens=8))
        assert err.value.param == "max_tokens"
    with pytest.raises(RequestError) as err:  # 40 tokens fit the context of 64, not a pool of 32
        paged.submit(list(range(40)), SamplingParams(max_tokens=8))
    assert err.value.param == "prompt"
