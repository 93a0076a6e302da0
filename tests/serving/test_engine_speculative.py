"""The engine with prompt lookup per slot (a tiny Mistral; a tiny Llama behind `serve --draft prompt-lookup`): every
greedy request equals mj.generate alone whatever shares the batch, though slots keep different counts; logprobs,
stop ids and max_tokens as plain; nothing recompiles after warm-up; sampled slots follow Leviathan's rule per row."""

import concurrent.futures
import os
import pathlib
import subprocess
import sys

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import scipy.stats

import mistral_jax as mj
from mistral_jax import sampling, speculative
from mistral_jax.compile_stats import CompileStats
from mistral_jax.sampling import metadata
from mistral_jax.serving.engine import Engine
from mistral_jax.serving.gate import EXPLORE_EVERY, WidthGate
from mistral_jax.serving.requests import SamplingParams
from tests.processes import free_port, kill_all, wait_until_serving

K = 4  # drafts per step; tiny-mistral's window of 8 makes its ring 8 + K slots
LOOP = 40  # a looping prompt: a random one plus this many of its own greedy tokens, which prompt lookup then finds


def _tokens(request) -> list[int]:
    return [t for event in request for t in event.token_ids]


@pytest.fixture(scope="module")
def engine():
    config = mj.ModelConfig.from_preset("tiny-mistral")  # initialised (key 6, found by trying a few) where greedy
    config, params = mj.unstack_layers(config, mj.init_params(config, jax.random.key(6)))  # output loops
    engine = Engine(config, params, max_batch=3, max_seq_len=96, prefill_chunk=16,
                    speculation=speculative.Speculation(K), gate=False).start()  # every draft verified: no timings
    yield engine, config, params
    engine.stop()


def test_slots_keep_different_counts_and_equal_generate_alone(engine):
    """Seven requests on three slots: random prompts (drafts mostly rejected) and looping ones (mostly kept); greedy
    ones equal plain greedy token for token, with max_tokens and a stop id cutting inside a step's drafts; logprobs
    equal the uncached forward's; sampled ones run beside them; nothing compiles once warm."""
    engine, config, params = engine
    rng = np.random.default_rng(0)
    random = [rng.integers(0, config.vocab_size, n).tolist() for n in (3, 12, 7)]
    reference = mj.generate(config, params, random, LOOP + 30)  # a row's greedy tokens do not depend on its batch
    looping = [p + r[:LOOP] for p, r in zip(random, reference)]
    expected = [r[LOOP:] for r in reference]  # what greedy makes after a looping prompt
    stop = expected[1][3]  # where a loop is drafted, this cuts inside the first step's drafts
    cases = [(random[0], SamplingParams(max_tokens=20), reference[0][:20]),
             (random[1], SamplingParams(max_tokens=13), reference[1][:13]),
             (looping[0], SamplingParams(max_tokens=25), expected[0][:25]),
             (looping[1], SamplingParams(max_tokens=30, stop_token_ids=(stop,)),
              expected[1][: expected[1].index(stop) + 1]),
             (looping[1], SamplingParams(max_tokens=23, logprobs=2), expected[1][:23]),
             (looping[2], SamplingParams(max_tokens=22), expected[2][:22])]
    def sampled_requests():
        return [engine.submit(p, SamplingParams(max_tokens=15, temperature=0.8, top_k=40, top_p=0.9, seed=i))
                for i, p in enumerate(looping[:2])]

    with CompileStats() as compiled:
        greedy = [engine.submit(prompt, params_) for prompt, params_, _ in cases]
        sampled = sampled_requests()
        events = [list(r) for r in greedy]
        sampled_tokens = [_tokens(r) for r in sampled]
    assert compiled.compilations == 0  # warm-up compiled the speculative step, the prefill buckets, the inserts
    assert [[t for e in ev for t in e.token_ids] for ev in events] == [want for *_, want in cases]
    assert [ev[-1].finish_reason for ev in events] == ["length"] * 3 + ["stop"] + ["length"] * 2
    assert [ev[-1].completion_tokens for ev in events] == [len(want) for *_, want in cases]
    accepted = [r.accepted_drafts for r in greedy]
    assert accepted[4] >= 8 and min(accepted) <= 3, accepted  # slots kept very different counts
    assert [len(t) for t in sampled_tokens] == [15, 15] and all(0 <= t < config.vocab_size for t in sampled_tokens[0])
    assert [_tokens(r) for r in sampled_requests()] == sampled_tokens  # the same seed again, in another batch

    prompt, tokens = cases[4][0], cases[4][2]  # logprobs of a request whose drafts were kept
    logits = np.asarray(mj.logits(config, params, [prompt + tokens]))[0, len(prompt) - 1:-1]
    reference_logprobs = jax.nn.log_softmax(logits)[np.arange(len(tokens)), tokens]
    np.testing.assert_allclose([e.logprobs[0].logprob for e in events[4]], reference_logprobs, atol=2e-4)
    assert all(e.logprobs[0].top[0][0] == t for e, t in zip(events[4], tokens))
    assert engine.active_slots == 0 and not engine.busy


def test_a_gate_that_finds_verifying_too_costly_keeps_to_plain_steps(engine):
    """Costs where no draft can pay: greedy is unchanged, and drafts are verified only at the gate's exploration
    steps (one every EXPLORE_EVERY held-back steps), whose kept drafts update its gains."""
    _, config, params = engine
    gate = WidthGate({0: 1.0, 2: 50.0, K: 60.0})
    gate.gains = {2: 0.0, K: 0.0}
    costly = Engine(config, params, max_batch=3, max_seq_len=96, prefill_chunk=16,
                    speculation=speculative.Speculation(K), gate=gate).start()
    try:
        random = np.random.default_rng(1).integers(0, config.vocab_size, 5).tolist()
        looping = random + mj.generate(config, params, [random], LOOP)[0]
        want = mj.generate(config, params, [looping], 40)[0]
        request = costly.submit(looping, SamplingParams(max_tokens=40))
        assert _tokens(request) == want
    finally:
        costly.stop()
    assert request.accepted_drafts <= (40 // EXPLORE_EVERY + 1) * K  # only exploration steps verified
    assert gate.gains[K] > 0 or gate.gains[2] > 0  # and what they kept was observed


def _chi_square_fit(tokens: np.ndarray, probs: np.ndarray) -> float:
    """p-value of the chi-square test that tokens were drawn from probs [V] (cells under 1e-9 left out)."""
    seen = probs > 1e-9
    assert np.all(np.isin(tokens, np.nonzero(seen)[0]))  # nothing outside the filtered support
    counts = np.bincount(tokens, minlength=len(probs))[seen]
    expected = probs[seen].astype(np.float64)
    return scipy.stats.chisquare(counts, expected / expected.sum() * counts.sum()).pvalue


def _reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """NumPy: softmax of logits [V] / temperature over the top-k, then the smallest nucleus of mass top_p."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x)
    keep = np.zeros(len(x), bool)
    keep[order[: top_k or len(x)]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    before = np.cumsum(p[order]) - p[order]  # mass strictly above each token
    keep[order[before >= top_p]] = False
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def test_accept_follows_each_rows_own_settings():
    """sampling.accept on 4096 rows of two settings (vocabulary 16), with prompt lookup's point-mass drafts and with
    drafts drawn from a draft model's q: in each group the first new token is distributed as that group's plain
    sampling distribution (a NumPy reference), and so is the second where the first draft was kept (chi-square,
    significance 0.001, fixed seeds); greedy rows keep drafts while they equal the argmax."""
    n, vocab = 4096, 16
    logits = jax.random.normal(jax.random.key(1), (1, 3, vocab)).repeat(n, 0) * 2  # [N, k + 1, V], k = 2
    settings = [(0.7, 5, 1.0), (1.3, 0, 0.8)]
    group = np.arange(n) % 2
    params = [mj.SamplingParams(temperature=t, top_k=k, top_p=p, seed=i)
              for i, (t, k, p) in enumerate(settings[g] for g in group)]
    rows_sampling = jax.tree.map(jnp.asarray, metadata(params, vocab))
    probs = [np.stack([_reference_probs(np.asarray(logits[0, j]), *s) for j in range(3)]) for s in settings]
    counts = jnp.asarray(np.arange(n) % 7, jnp.int32)
    lookup = jnp.tile(jnp.asarray([[int(np.argmax(probs[0][0])), 3]]), (n, 1))  # often kept, sometimes not
    q = jax.nn.softmax(jax.random.normal(jax.random.key(2), (1, 2, vocab)), -1).repeat(n, 0)  # [N, k, V]
    from_q = jax.random.categorical(jax.random.key(3), jnp.log(q)).astype(jnp.int32)  # [N, k]
    accept = jax.jit(sampling.accept)
    for drafts, draft_q in [(lookup, None), (from_q, q)]:
        kept, emitted = (np.asarray(x) for x in accept(logits, drafts, rows_sampling, counts, draft_q))
        for g in (0, 1):
            rows = group == g
            assert 0 < np.mean(kept[rows] >= 1) < 1
            assert _chi_square_fit(emitted[rows, 0], probs[g][0]) > 1e-3
            assert _chi_square_fit(emitted[rows & (kept >= 1), 1], probs[g][1]) > 1e-3
    greedy = jax.tree.map(jnp.asarray, metadata([mj.SamplingParams()] * n, vocab))
    kept, emitted = (np.asarray(x) for x in accept(logits, lookup, greedy, counts))
    target = np.argmax(np.asarray(logits), -1)
    assert np.array_equal(emitted, target)
    assert np.array_equal(kept, np.cumprod(np.asarray(lookup) == target[:, :2], axis=1).sum(1))


FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "hf" / "llama_mha"  # a tiny Llama without a tokenizer


@pytest.mark.slow
def test_serve_with_prompt_lookup_answers_through_the_openai_client():
    """`serve --draft prompt-lookup --draft-tokens 2` on a tiny Llama starts and answers concurrent greedy
    completions of token ids as mj.generate does each alone; --draft-tokens 0 is refused (the vocabulary check of
    a draft model: test_a_draft_model_per_slot_..., and test_speculative's through from_draft, which serve calls)."""
    port = free_port()
    command = [sys.executable, "-m", "mistral_jax.cli", "serve", "--checkpoint", str(FIXTURE), "--port", str(port),
               "--max-batch", "2", "--max-seq-len", "48", "--prefill-chunk", "8", "--draft", "prompt-lookup",
               "--draft-tokens", "2"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "XLA_FLAGS": ""})
    try:
        wait_until_serving(process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        config, params = mj.load(FIXTURE, scan_layers=False)
        rng = np.random.default_rng(1)
        prompts = [[5, 6, 7, 8] * 3, rng.integers(0, 128, 9).tolist(), [40, 41, 42] * 4]
        prompts[0] += mj.generate(config, params, prompts[:1], 16)[0]  # ends in a loop that greedy keeps up
        reference = mj.generate(config, params, prompts, 16)  # each row as it would be alone

        def complete(prompt):  # token ids back (no tokenizer: logprobs name tokens "token_id:N")
            out = client.completions.create(model=FIXTURE.name, prompt=prompt, max_tokens=16, temperature=0,
                                            logprobs=0)
            assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"
            return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]

        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three requests on two slots
            assert list(pool.map(complete, prompts)) == reference
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        kept = [float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("mistral_jax_accepted_draft_tokens_total ")]
        assert kept and kept[0] > 0, metrics  # prompt lookup ran: the repeating prompts' drafts were kept
    finally:
        kill_all([process])
    refused = subprocess.run([sys.executable, "-m", "mistral_jax.cli", "serve", "--checkpoint", str(FIXTURE),
                              "--draft-tokens", "0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--draft-tokens: must be a positive integer" in refused.stderr


def test_a_draft_model_per_slot_keeps_greedy_and_compiles_once():
    """A noisy copy of the tiny Mistral drafts 3 tokens per slot (its own cache rows, prefilled on insert): five
    greedy requests on three slots equal generate alone, with drafts kept and rejected; sampled ones run beside
    them; nothing compiles once warm. A draft of another vocabulary is refused."""
    config = mj.ModelConfig.from_preset("tiny-mistral")
    config, params = mj.unstack_layers(config, mj.init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(7)  # NumPy: jax's eager ops compiled a program per leaf shape and op
    noisy = jax.tree.map(lambda x: (np.asarray(x) + 0.2 * np.std(np.asarray(x)) * rng.standard_normal(x.shape))
                         .astype(x.dtype), params)
    with pytest.raises(mj.UserError, match="share the tokenizer"):
        Engine(config, params, speculation=speculative.Speculation(3, config.replace(vocab_size=64)), warm_up=False)
    engine = Engine(config, params, max_batch=3, max_seq_len=64, prefill_chunk=16,
                    speculation=speculative.Speculation(3, config), draft_params=noisy).start()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (3, 12, 7, 30, 5)]
    try:
        with CompileStats() as compiled:
            greedy = [engine.submit(p, SamplingParams(max_tokens=20)) for p in prompts]
            sampled = [engine.submit(p, SamplingParams(max_tokens=9, temperature=0.8, seed=1)) for p in prompts[:2]]
            tokens, sampled_tokens = [_tokens(r) for r in greedy], [_tokens(r) for r in sampled]
    finally:
        engine.stop()
    assert compiled.compilations == 0
    assert tokens == mj.generate(config, params, prompts, 20)
    assert 0 < sum(r.accepted_drafts for r in greedy) < 3 * sum(len(t) for t in tokens) // 4  # kept and rejected
    assert [len(t) for t in sampled_tokens] == [9, 9]
