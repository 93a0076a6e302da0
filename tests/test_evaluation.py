"""mj.perplexity (strided windows, as transformers' perplexity guide) and `mistral-jax eval`; int8 quality on the
real SmolLM2-135M over a short slice of the held-out text (benchmarks/int8_quality.py measures all of it)."""

import json
import pathlib

import jax
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import cli, evaluation

HELDOUT = pathlib.Path(__file__).resolve().parent / "data" / "heldout_en.txt"


def reference_nll(config, params, ids, seq_len, stride, weights=None):
    """transformers' guide, literally: each window's last (end - prev_end) tokens are its labels."""
    ids = np.asarray(ids)
    weights = np.ones(len(ids)) if weights is None else np.asarray(weights, np.float64)
    nll = count = 0.0
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        logits = np.asarray(mj.logits(config, params, ids[None, begin:end]), np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for j in range(max(prev_end, begin + 1), end):
            nll -= weights[j] * logp[j - begin - 1, ids[j]]
            count += weights[j]
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def test_strided_windows_match_the_transformers_guide():
    assert evaluation.windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert evaluation.windows(3, 8, 4) == [(0, 3, 1)]
    config = mj.ModelConfig.from_preset("tiny-llama")
    params = mj.init_params(config, jax.random.key(0))
    ids = np.asarray(jax.random.randint(jax.random.key(2), (37,), 0, config.vocab_size))
    mask = np.arange(37) % 3 != 0
    for seq_len, stride, weights in ((16, 16, None), (16, 5, None), (16, 7, mask)):
        got = mj.perplexity(config, params, ids, weights=weights, seq_len=seq_len, stride=stride)
        nll, count = reference_nll(config, params, ids, seq_len, stride, weights)
        assert got.tokens == count and got.nll == pytest.approx(nll, rel=1e-5)
    pooled = mj.perplexity(config, params, [ids[:20], ids[20:]], seq_len=16, stride=8)
    assert pooled.tokens == 19 + 16
    with pytest.raises(mj.UserError, match="stride must be in"):
        mj.perplexity(config, params, ids, seq_len=8, stride=9)


def test_smollm2_int8_perplexity_and_the_eval_command(capsys, tmp_path):
    """int8 weights within 3% of float32's perplexity with either matmul (the decode path's int8 dots too), the
    int8 KV cache within 1%, over ~300 tokens; `eval --quantize int8 --json` gives the Python number, and a
    JSONL chat file scores its assistant tokens only."""
    from mistral_jax.checkpoints.embedded import default_model_path

    path = default_model_path()
    tokenizer = mj.load_tokenizer(path)
    text = HELDOUT.read_text()[:1300]
    ids = tokenizer.encode(text)
    config, params = mj.load(path)
    settings = dict(seq_len=128, stride=64)
    base = mj.perplexity(config, params, ids, **settings).perplexity
    kv = mj.perplexity(config.replace(kv_cache_dtype="int8"), params, ids, **settings).perplexity
    assert 1e-4 < abs(kv / base - 1) < 0.01  # the cache's int8 rounding shows (0.28% when written), and stays small
    chat = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    chat.write_text(json.dumps({"messages": messages}) + "\n")
    tokens, weights = cli._eval_tokens(chat, tokenizer, config)
    prompt = tokenizer.apply_chat_template(messages[:1])  # up to the assistant's header
    answer = tokenizer.apply_chat_template(messages, add_generation_prompt=False)[len(prompt):]
    assert answer[:2] == tokenizer.encode("Blue.") and tokenizer.stop_ids[0] in answer  # "Blue.", the turn's end
    assert list(tokens[0]) == prompt + answer
    assert np.asarray(weights[0], bool).tolist() == [False] * len(prompt) + [True] * len(answer)  # exactly those
    qconfig, qparams = mj.quantize(config, params)  # deletes the float weights
    int8 = mj.perplexity(qconfig, qparams, ids, **settings).perplexity  # auto: 128-row windows dequantize
    int8_dot = mj.perplexity(qconfig.replace(quant_matmul="int8_dot"), qparams, ids, **settings).perplexity
    assert abs(int8 / base - 1) < 0.03 and abs(int8_dot / base - 1) < 0.03 and int8 != int8_dot

    data = tmp_path / "text.txt"
    data.write_text(text)
    code = cli.main(["eval", "--data", str(data), "--seq-len", "128", "--quantize", "int8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["quantize"] == "int8" and report["stride"] == 64
    assert report["perplexity"] == pytest.approx(int8, rel=1e-4) and report["tokens_per_second"] > 0

