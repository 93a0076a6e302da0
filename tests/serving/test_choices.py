"""`n > 1` through the real server (uvicorn on loopback, in this process) with the `openai` client, over the slot
engine and the paged one, with a tiny model on SmolLM2's tokenizer: each choice has its own index, streamed as
not; choice j equals mj.generate alone seeded seed + j (generate's recipe for batch rows), so seeded choices differ
and repeat; the paged engine's choices share the prompt's pages; a bad n is a 400 naming it."""

import functools

import httpx
import jax
import numpy as np
import openai
import pytest

import mistral_jax as mj
from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.serving.engine import Engine
from mistral_jax.serving.paged_engine import PagedEngine
from mistral_jax.tokenizers import load_tokenizer
from tests.serving.live import AUTH, KEY, MODEL, serving_in_process

pytestmark = pytest.mark.slow
QUEUE, PAGE = 12, 8
_MODEL = ()  # the model fixture's (config, params, tokenizer), for _generate


@pytest.fixture(scope="module")
def model():
    tokenizer = load_tokenizer(default_model_path())
    config = mj.ModelConfig.from_preset("tiny-llama").replace(vocab_size=tokenizer.vocab_size, max_seq_len=128)
    params = mj.init_params(config, jax.random.key(3))
    global _MODEL
    _MODEL = config, params, tokenizer
    return _MODEL


@pytest.fixture(scope="module", params=["slots", "paged"])
def served(request, model):
    """(engine, openai client, url) of a server over the tiny model."""
    config, params, tokenizer = model
    config, params = mj.unstack_layers(config, params)
    if request.param == "paged":
        engine = PagedEngine(config, params, tokenizer, page_size=PAGE, max_total_tokens=512,
                             max_num_batched_tokens=16, max_batch=4, max_seq_len=64, max_queue=QUEUE)
    else:
        engine = Engine(config, params, tokenizer, max_batch=4, max_seq_len=64, prefill_chunk=32, max_queue=QUEUE)
    engine.start()
    with serving_in_process(engine, tokenizer) as url:
        yield engine, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0), url
    engine.stop()


@functools.cache
def _generate(prompt: tuple[int, ...], max_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
    """mj.generate of one prompt alone (shared by both engines' runs)."""
    config, params, _ = _MODEL
    return mj.generate(config, params, [list(prompt)], max_tokens, temperature=temperature, seed=seed)[0]


def _text(tokenizer, ids: list[int]) -> str:
    """The text a stream of these tokens shows: an unfinished UTF-8 character at the end is never sent."""
    return tokenizer.decode(ids).rstrip("\ufffd")


def _ids(choice) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]


def test_completion_choices_equal_generate_seeded_seed_plus_j(served, model):
    engine, client, _ = served
    config, params, _ = model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (13, 6)]
    settings = dict(model=MODEL, max_tokens=10, temperature=1.0, seed=41, logprobs=0,
                    extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    hits = engine.metrics.registry.get_sample_value("mistral_jax_prefix_cache_hits_tokens_total") or 0
    out = client.completions.create(prompt=prompts[0], n=3, **settings)
    assert [c.index for c in out.choices] == [0, 1, 2]
    got = [_ids(c) for c in out.choices]
    assert got == [_generate(tuple(prompts[0]), 10, 1.0, 41 + j) for j in range(3)]
    assert len({tuple(g) for g in got}) == 3  # seeded choices differ from each other
    assert out.usage.prompt_tokens == 13 and out.usage.completion_tokens == 30
    if isinstance(engine, PagedEngine):  # choices 1 and 2 read choice 0's full prompt pages (12 of 13 tokens)
        now = engine.metrics.registry.get_sample_value("mistral_jax_prefix_cache_hits_tokens_total")
        assert now - hits >= 2 * (13 // PAGE) * PAGE
    assert client.completions.create(prompt=prompts[0], n=3, **settings).choices[2].text == out.choices[2].text

    # two prompts, two choices each, streamed: choice i * n + j is prompt i's j-th, as vLLM numbers them
    streamed: dict[int, list[int]] = {}
    for chunk in client.completions.create(prompt=prompts, n=2, stream=True, **settings):
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(_ids(c))
    assert streamed == {i * 2 + j: _generate(tuple(prompts[i]), 10, 1.0, 41 + j)
                        for i in range(2) for j in range(2)}


def test_chat_choices_streamed_and_not(served, model):
    _, client, _ = served
    config, params, tokenizer = model
    messages = [{"role": "user", "content": "Name three colours."}]
    prompt = tokenizer.apply_chat_template(messages)
    settings = dict(model=MODEL, messages=messages, max_tokens=8, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(n=3, temperature=0.7, seed=9, **settings)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    expected = [_text(tokenizer, _generate(tuple(prompt), 8, 0.7, 9 + j))
                for j in range(3)]
    assert [c.message.content for c in whole.choices] == expected and len(set(expected)) == 3
    assert whole.usage.prompt_tokens == len(prompt) and whole.usage.completion_tokens == 24

    text, finish, usage = {}, {}, None
    for chunk in client.chat.completions.create(n=3, temperature=0.7, seed=9, stream=True,
                                                stream_options={"include_usage": True}, **settings):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert text == dict(enumerate(expected)) and finish == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 24 and usage.prompt_tokens == len(prompt)

    greedy = client.chat.completions.create(n=2, temperature=0, **settings)  # as OpenAI: n alike greedy choices
    assert greedy.choices[0].message.content == greedy.choices[1].message.content == _text(
        tokenizer, _generate(tuple(prompt), 8))


@pytest.mark.parametrize("body", [{"n": 0}, {"n": QUEUE + 1}, {"n": 129}])
def test_a_bad_n_is_a_400_naming_it(served, body):
    _, _, url = served
    response = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=30,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n", response.text
    response = httpx.post(url + "/v1/completions", headers=AUTH, timeout=30,  # 2 prompts x 7 choices > the queue
                          json={"model": MODEL, "prompt": [[1, 2], [3, 4]], "n": QUEUE // 2 + 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n", response.text
