"""int8 quality on SmolLM2-135M: perplexity of the held-out text and greedy agreement with float32.

    python benchmarks/int8_quality.py [--checkpoint PATH] [--seq-len 512] [--stride 256] [--json PATH]

Perplexity (mj.perplexity) over tests/data/heldout_en.txt for: float32; int8 weights with each int8 matmul
(int8_dot: int8 x int8 dots with per-row activation scales, the CPU's; dequant: weight-only); an int8 KV cache
(float32 weights; the windows run through the cache in chunks, as prefill does) against a float32 cache read
the same way. Greedy agreement: float32 greedy-decodes --new-tokens after each chat prompt; the fraction of
those positions where each int8 variant's argmax (teacher-forced on float32's tokens) is the same token.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import mistral_jax as mj  # noqa: E402

HELDOUT = _common.REPO / "tests" / "data" / "heldout_en.txt"
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain what a hash table is in two sentences.", "Give me three tips for a job interview.",
           "Why is the sky blue?", "Translate 'good morning' into Spanish and German."]


def agreement(config, params, sequences, prompt_lens) -> float:
    """Fraction of the continuation positions where this model's argmax equals the float32 greedy token."""
    same = total = 0
    for ids, n in zip(sequences, prompt_lens):
        logits = mj.logits(config, params, np.asarray([ids]))[0]
        predicted = np.asarray(jnp.argmax(logits[n - 1:-1], axis=-1))
        same += int(np.sum(predicted == np.asarray(ids[n:])))
        total += len(ids) - n
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2-135M GGUF")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = _common.machine()
    args.checkpoint, config, params = _common.load_model(args.checkpoint)
    tokenizer = mj.load_tokenizer(args.checkpoint)
    ids = tokenizer.encode(HELDOUT.read_text())
    settings = dict(seq_len=args.seq_len, stride=args.stride)

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    sequences = [p + mj.generate(config, params, [p], args.new_tokens)[0] for p in prompts]
    lens = [len(p) for p in prompts]

    results = {"float32": mj.perplexity(config, params, ids, **settings).to_dict()}
    results["float32, float32 KV cache (chunked)"] = mj.perplexity(
        config.replace(kv_cache_dtype="float32"), params, ids, **settings).to_dict()
    results["float32, int8 KV cache (chunked)"] = mj.perplexity(
        config.replace(kv_cache_dtype="int8"), params, ids, **settings).to_dict()
    agree = {"float32, int8 KV cache": None}
    qconfig, qparams = mj.quantize(config, jax.tree.map(jnp.copy, params))
    for kernel in ("int8_dot", "dequant"):
        c = qconfig.replace(quant_matmul=kernel)
        results[f"int8 weights ({kernel})"] = mj.perplexity(c, qparams, ids, **settings).to_dict()
        agree[f"int8 weights ({kernel})"] = agreement(c, qparams, sequences, lens)
    base = results["float32"]["perplexity"]
    cache_base = results["float32, float32 KV cache (chunked)"]["perplexity"]
    rows = []
    for name, r in results.items():
        ref = cache_base if "KV cache" in name else base
        r["vs_reference"] = r["perplexity"] / ref
        rows.append([name, f"{r['perplexity']:.3f}", f"{100 * (r['vs_reference'] - 1):+.2f}%",
                     f"{agree[name]:.3f}" if agree.get(name) is not None else "-", f"{r['tokens_per_second']:.0f}"])
    print(f"int8 quality, {pathlib.Path(args.checkpoint).name}; {len(ids)} tokens of {HELDOUT.name}, windows of "
          f"{args.seq_len}, stride {args.stride}; greedy agreement over {len(PROMPTS)} chat prompts x "
          f"{args.new_tokens} tokens; {_common.machine_line(info)}")
    print(_common.table(["model", "perplexity", "vs float32", "greedy agreement", "eval tokens/s"], rows))
    _common.write_json(args.json, {"benchmark": "int8_quality", "machine": info, "checkpoint": args.checkpoint,
                                   "tokens": len(ids), "seq_len": args.seq_len, "stride": args.stride,
                                   "perplexity": results, "greedy_agreement": agree})


if __name__ == "__main__":
    main()
