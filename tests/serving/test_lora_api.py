"""`mistral-jax serve --lora-modules` as a user runs it, on the tiny Llama fixture: a request's model picks its adapter
(equal to mj.generate on that adapter merged), /v1/models lists adapters with their parent, adapters load and unload
at run time (vLLM's routes, behind the API key), an unknown one is OpenAI's 404, one for another base a 400 naming
what differs, and refused at start-up alike."""

import pathlib
import subprocess
import sys

import httpx
import openai
import pytest

import mistral_jax as mj
from mistral_jax import lora
from mistral_jax.checkpoints import peft
from tests.serving.live import AUTH, openai_client, running_server
from tests.serving.test_lora_engine import random_adapter

pytestmark = pytest.mark.slow
FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
TINY = FIXTURES / "hf" / "llama_mha"
SMOLLM2_ADAPTER = FIXTURES / "peft" / "smollm2_lora"  # a PEFT adapter for another base
BASE = "tiny-base"
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config, params = mj.load(TINY)
    directory = tmp_path_factory.mktemp("adapters")
    adapters = {name: random_adapter(config, params, seed, rank, tuple(lora.TARGETS) if seed else ("wq", "wv"))
                for seed, (name, rank) in enumerate({"one": 2, "two": 4, "three": 8}.items())}
    paths = {name: str(peft.write(config, a, directory / name, base_model=str(TINY))) for name, a in adapters.items()}
    return config, params, paths


@pytest.fixture(scope="module")
def server(tiny):
    _, _, paths = tiny
    with running_server("--checkpoint", str(TINY), "--served-model-name", BASE, "--max-batch", "4",
                        "--max-seq-len", "64", "--prefill-chunk", "16", "--max-loras", "2", "--max-lora-rank", "8",
                        "--enable-lora-loading", "--lora-modules", f"one={paths['one']}",
                        f"two={paths['two']}") as running:
        yield running[1]


def _expected(tiny, name):
    config, params, paths = tiny
    if name is not None:
        adapter = mj.load_adapter(paths[name], config)
        params = lora.merge(params, adapter.weights, adapter.scale)
    return mj.generate(config, params, PROMPTS, 10)


def _completions(client, model) -> list[list[int]]:
    """Greedy continuations of PROMPTS (as token ids: logprobs with return_tokens_as_token_ids)."""
    out = []
    for prompt in PROMPTS:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                           extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
        assert answer.model == model
        out.append([int(t.removeprefix("token_id:")) for t in answer.choices[0].logprobs.tokens])
    return out


def test_models_pick_adapters_and_load_unload_at_run_time(server, tiny):
    client = openai_client(server)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE, "one", "two"}
    assert cards["one"].parent == cards["two"].parent == BASE and cards[BASE].parent is None
    assert _completions(client, "one") == _expected(tiny, "one")
    assert _completions(client, BASE) == _expected(tiny, None)
    # Load a third adapter (past --max-loras 2: the least recently used is swapped out), then unload one.
    body = {"lora_name": "three", "lora_path": tiny[2]["three"]}
    assert httpx.post(server + "/v1/load_lora_adapter", json=body).status_code == 401  # behind the API key
    response = httpx.post(server + "/v1/load_lora_adapter", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert httpx.post(server + "/v1/load_lora_adapter", json=body, headers=AUTH).status_code == 400  # already there
    assert _completions(client, "three") == _expected(tiny, "three")
    assert _completions(client, "two") == _expected(tiny, "two")
    assert _completions(client, "one") == _expected(tiny, "one")
    response = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "one"}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert {m.id for m in client.models.list().data} == {BASE, "two", "three"}
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="one", prompt=PROMPTS[0], max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    response = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "one"}, headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_an_adapter_for_another_base_is_refused(server, tiny):
    body = {"lora_name": "smol", "lora_path": str(SMOLLM2_ADAPTER)}
    response = httpx.post(server + "/v1/load_lora_adapter", json=body, headers=AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "lora_path" and "model.layers.14." in error["message"] and "\n" not in error["message"]
    # At start-up: one line on stderr naming what differs, and a non-zero exit.
    command = [sys.executable, "-m", "mistral_jax.cli", "serve", "--checkpoint", str(TINY), "--port", "0",
               "--lora-modules", f"smol={SMOLLM2_ADAPTER}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "model.layers.14." in done.stderr and "Traceback" not in done.stderr
