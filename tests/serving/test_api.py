"""`mistral-jax serve` as a user runs it: the real server (uvicorn) on a loopback port, the embedded SmolLM2,
spoken to with the official openai client and raw HTTP. Tests run in file order; the last sends SIGTERM."""

import concurrent.futures
import re
import signal
import time

import httpx
import numpy as np
import openai
import pytest

import mistral_jax as mj
from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.tokenizers import load_tokenizer
from tests.serving.live import KEY, MODEL, openai_client, running_server

CONTEXT = 256
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with running_server("--max-batch", "8", "--max-queue", "16", "--max-seq-len", str(CONTEXT),
                        "--prefill-chunk", "32", "--max-num-batched-tokens", "32") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server[1])


@pytest.fixture(scope="module")
def smollm2():
    """The reference in the scanned layout, which compiles in a fraction of the unscanned one's time (the server
    decodes unscanned: its tokens and logprobs are checked across the two layouts)."""
    config, params = mj.load(default_model_path())
    return config, params, load_tokenizer(default_model_path())


def _metric(url: str, name: str, labels: str = "[^}]*") -> float:
    """The metric's value summed over its series whose labels match `labels` (a regular expression)."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{{labels}}})? (\S+)$", text, re.M))


def _wait_idle(url: str) -> None:
    """Until no request holds a slot (at most 10 s): then asserts so."""
    deadline = time.monotonic() + 10
    while _metric(url, "mistral_jax_active_slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(url, "mistral_jax_active_slots") == 0


def test_chat_and_completions_streamed_and_not(client, smollm2):
    _, _, tokenizer = smollm2
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chat.choices[0].message.content == streamed and streamed
    # OpenAI's include_usage: every chunk has usage null but the last, which has no choices
    assert chat.choices[0].finish_reason in ("stop", "length") and chunks[-2].choices[0].finish_reason
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    prompt_ids = tokenizer.apply_chat_template(messages)
    assert chat.usage.prompt_tokens == len(prompt_ids) == chunks[-1].usage.prompt_tokens
    assert chat.usage.completion_tokens == chunks[-1].usage.completion_tokens > 0
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason

    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    ids = client.completions.create(model=MODEL, prompt=tokenizer.encode("The capital of France is"), max_tokens=6,
                                    temperature=0)
    assert text.choices[0].text == ids.choices[0].text and text.usage.completion_tokens == 6
    assert text.choices[0].finish_reason == "length"
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                        stop=[text.choices[0].text.split()[1]])
    assert stopped.choices[0].finish_reason == "stop" and text.choices[0].text.startswith(stopped.choices[0].text)


def test_echo_logprobs_score_the_prompt_as_the_model_does(client, smollm2):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, temperature 0."""
    config, params, tokenizer = smollm2
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(prompt) + 1 and logprobs.token_logprobs[0] is None
    logits = np.asarray(mj.logits(config, params, [prompt]))[0]
    log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    expected = log_softmax[np.arange(len(prompt) - 1), prompt[1:]]
    np.testing.assert_allclose(logprobs.token_logprobs[1:len(prompt)], expected, atol=1e-3)
    assert logprobs.token_logprobs[-1] == pytest.approx(log_softmax[-1].max(), abs=1e-3)  # greedy: the top token


def test_concurrent_greedy_requests_each_equal_generate_alone(client, smollm2):
    config, params, _ = smollm2
    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, config.vocab_size, n).tolist() for n in rng.integers(3, 70, 16)]
    max_tokens = rng.integers(1, 12, 16).tolist()

    def ask(i):
        out = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=max_tokens[i], temperature=0,
                                        logprobs=0, extra_body={"ignore_eos": True})
        return [t for t in out.choices[0].logprobs.tokens]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        served = list(pool.map(ask, range(16)))
    _, _, tokenizer = smollm2
    alone = [mj.generate(config, params, [p], m)[0] for p, m in zip(prompts, max_tokens)]
    assert served == [[tokenizer.decode([t]) for t in row] for row in alone]


def test_streamed_text_never_splits_a_character(client):
    prompts = ("Emoji: 🙂🙃🙂🙃🙂🙃🙂🙃🙂🙃🙂🙃", "中文：你好，世界。你好，世界。你好，世界。你好，世界。")

    def ask(prompt_and_stream):  # the four requests decode together in the server's slots
        prompt, stream = prompt_and_stream
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=stream)
        return [c.choices[0].text for c in out] if stream else out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [(p, stream) for p in prompts for stream in (False, True)]))
    for whole, pieces in zip(answers[::2], answers[1::2]):
        assert "".join(pieces) == whole and not any("\ufffd" in p for p in pieces)
        assert any(ord(ch) > 0x2E80 for ch in whole)  # the answer has emoji or CJK characters to split


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT}, "max_tokens"),
    ({"model": MODEL, "prompt": [1, 2, 10**6]}, "prompt"),
])
def test_bad_input_gets_a_400_naming_the_field(server, body, param):
    url = server[1]
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(url + path, headers=headers, **({"content": body} if isinstance(body, bytes) else
                                                         {"json": body}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_unknown_model_gets_openais_404(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert "gpt-4" in err.value.body["message"]


def test_api_key_disconnect_and_backpressure(server, client):
    url = server[1]
    assert httpx.get(url + "/v1/models").status_code == 401
    assert client.models.list().data[0].id == MODEL
    cancelled = _metric(url, "mistral_jax_requests_total", 'finish_reason="cancelled"')
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()  # held: a dropped iterator closes the connection (httpcore closes on GeneratorExit)
        next(lines)
        assert _metric(url, "mistral_jax_active_slots") == 1, "".join(server[0].log_tail)
    _wait_idle(url)
    assert _metric(url, "mistral_jax_requests_total", 'finish_reason="cancelled"') == cancelled + 1
    cancelled += 1
    with pytest.raises(httpx.ReadTimeout):  # a client that leaves a request that is not streamed frees it too
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=1.0,
                   headers={"Authorization": f"Bearer {KEY}"})
    _wait_idle(url)
    assert _metric(url, "mistral_jax_requests_total", 'finish_reason="cancelled"') == cancelled + 1, \
        "".join(server[0].log_tail)

    def ask(_):
        return httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                          json={"model": MODEL, "prompt": "Hello", "max_tokens": 12, "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(ask, range(40)))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503} and codes.count(200) >= 16  # the queue alone holds 16
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "server_busy"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_penalties_and_logit_bias_reach_the_model(client, smollm2):
    """temperature 0 with presence, frequency and repetition penalties and a logit_bias equals mj.generate with the
    same settings; a bias of -100 on plain greedy's first token changes the answer."""
    config, params, tokenizer = smollm2
    prompt = tokenizer.encode("List the days of the week: Monday, Tuesday, Monday, Tuesday,")
    plain = mj.generate(config, params, [prompt], 10)[0]
    settings = {"presence_penalty": 0.6, "frequency_penalty": 0.4, "repetition_penalty": 1.2,
                "logit_bias": {str(plain[0]): -100}}
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                    presence_penalty=0.6, frequency_penalty=0.4, logit_bias=settings["logit_bias"],
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.2})
    expected = mj.generate(config, params, [prompt], 10, sampling=mj.SamplingParams(**settings))[0]
    assert out.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in expected]
    assert expected[0] != plain[0]


def test_bad_settings_are_400s_naming_the_field_and_fail_alone(server, client, smollm2):
    """While another client streams, requests with top_k 2**40, a string penalty, a non-id logit_bias key or an
    out-of-range min_p get 400 naming the field, decided at submission; the stream finishes untouched (equal to
    mj.generate alone)."""
    config, params, tokenizer = smollm2
    _, url = server
    prompt = tokenizer.encode("Count slowly from one to fifty:")
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    text = [next(chunks).choices[0].text]  # the stream has started decoding
    bad = [({"top_k": 2**40}, "top_k"), ({"presence_penalty": "x"}, "presence_penalty"),
           ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
           ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
           ({"frequency_penalty": True}, "frequency_penalty"), ({"seed": 2**64}, "seed")]
    for settings, field in bad:
        response = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": MODEL, "prompt": "hi", "max_tokens": 4, **settings})
        assert response.status_code == 400, settings
        assert response.json()["error"]["param"] == field, settings
    text += [c.choices[0].text for c in chunks]
    expected = mj.generate(config, params, [prompt], 40)[0]
    assert "".join(text) == tokenizer.decode(expected)


# Last: it stops the module's shared server.
def test_sigterm_finishes_requests_in_flight_and_exits_0(server, client):
    process, _ = server
    stream = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=40, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    process.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first.choices[0].finish_reason is None and rest[-1].choices[0].finish_reason == "length"
    assert process.wait(timeout=60) == 0
