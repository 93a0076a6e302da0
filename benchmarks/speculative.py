"""Speculative decoding on the real SmolLM2: prompt lookup against plain `mj.generate`, greedy.

    python benchmarks/speculative.py [--checkpoint PATH] [--draft-tokens 4,8] [--max-new-tokens 128]
                                     [--rounds 3] [--tasks quote,...] [--json PATH]

Tasks: input-grounded ones (quote, rewrite or edit a passage or code given in the prompt), where the answer
copies long runs of the prompt, and open chat, where it copies little. Each is the embedded chat template
around one user message, greedy, unscanned layout (what the CLI decodes with). Per task and k: tokens/s of
the whole generate call (prefill included, the same for both) against plain `mj.generate`, best of --rounds
interleaved runs; whether the tokens are identical; acceptance (draft tokens kept / verified) and mean
tokens per target forward (new tokens after the first / verify forwards). Compilations during the timed
rounds are counted (must be 0). Then what bounds the speedup: one verify forward of k + 1 tokens against one
decode step, over a cache holding 256 positions (best of --rounds * 5 interleaved calls).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import mistral_jax as mj  # noqa: E402
from mistral_jax import decoding, step  # noqa: E402

PASSAGE = (
    "The Amazon rainforest covers much of the Amazon basin of South America. This basin encompasses seven "
    "million square kilometres, of which five and a half million square kilometres are covered by the rainforest. "
    "The region includes territory belonging to nine nations and 3,344 formally acknowledged indigenous "
    "territories. The majority of the forest, 60%, is in Brazil, followed by Peru with 13%, and Colombia with 10%."
)
CODE = '''def total(xs):
    t = 0
    for x in xs:
        t = t + x
    return t


def mean(xs):
    if len(xs) == 0:
        return 0
    return total(xs) / len(xs)
'''
TASKS = {
    "quote": ("grounded", f"Repeat the following passage word for word.\n\n{PASSAGE}"),
    "rewrite": ("grounded", f"Rewrite the following passage in the past tense, changing nothing else.\n\n{PASSAGE}"),
    "edit_code": ("grounded", f"Rename the function `total` to `sum_all` in this code and show the whole code.\n\n"
                              f"```python\n{CODE}```"),
    "chat_story": ("open", "Tell me a short story about a dragon who learns to cook."),
    "chat_advice": ("open", "What are some good ways to stay productive when working from home?"),
}


def speculative_run(config, params, prompt, max_new_tokens, draft_tokens, eos_id):
    """(tokens, state) of one speculative generate: decoding's own path, kept for its statistics."""
    state = decoding.run(config, params, [prompt], max_new_tokens, eos_id=eos_id, draft="prompt-lookup",
                         draft_tokens=draft_tokens)
    tokens = np.asarray(state.tokens)[0, :max_new_tokens].tolist()
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens, state


def verify_cost(config, params, ks, rounds):
    """Seconds of one verify forward of k + 1 tokens (k = 0: a decode step) at position 256, best of `rounds`."""
    runners = {}
    for k in [0, *ks]:
        cache = mj.init_cache(config, 1, 512, lookahead=k)
        _, cache = decoding.prefill(config, params, cache, [list(range(256))], [list(range(256))])
        verify = jax.jit(functools.partial(step.forward_tokens, config, None))  # the cache not donated: reused
        args = (params, cache, jnp.full((1, k + 1), 7, jnp.int32), 256 + jnp.arange(k + 1)[None])
        jax.block_until_ready(verify(*args))
        runners[k] = functools.partial(verify, *args)
    samples, _ = _common.interleaved_rounds(runners, rounds, lambda fn: _common.best(fn, 1))
    return {k: min(v) for k, v in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--draft-tokens", default="4,8")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = _common.machine()
    checkpoint, config, params = _common.load_model(args.checkpoint)
    config, params = mj.unstack_layers(config, params)
    tokenizer = mj.load_tokenizer(checkpoint)
    eos_id = tokenizer.eos_id
    ks = [int(k) for k in args.draft_tokens.split(",")]
    n = args.max_new_tokens

    prompts, runners, stats = {}, {}, {}
    for task in args.tasks.split(","):
        prompts[task] = tokenizer.apply_chat_template([{"role": "user", "content": TASKS[task][1]}])
        plain = functools.partial(mj.generate, config, params, [prompts[task]], n, eos_id=eos_id)
        expected = plain()[0]
        runners[(task, "plain")] = plain
        for k in ks:
            tokens, state = speculative_run(config, params, prompts[task], n, k, eos_id)
            made = min(int(state.counts[0]), n) if eos_id not in tokens else len(tokens)
            stats[(task, k)] = {
                "identical": tokens == expected,
                "new_tokens": len(tokens),
                "acceptance": float(state.accepted[0]) / max(int(state.drafted[0]), 1),
                "drafted": int(state.drafted[0]),
                "tokens_per_step": (int(state.counts[0]) - 1) / max(int(state.steps), 1),
                "steps": int(state.steps),
                "made": made,
            }
            runners[(task, k)] = functools.partial(mj.generate, config, params, [prompts[task]], n, eos_id=eos_id,
                                                   draft="prompt-lookup", draft_tokens=k)
        stats[(task, "plain")] = {"new_tokens": len(expected), "text": tokenizer.decode(expected)}

    def measure(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    samples, compilations = _common.interleaved_rounds(runners, args.rounds, measure)
    best = {key: min(v) for key, v in samples.items()}
    rows, results = [], {}
    for task in prompts:
        kind = TASKS[task][0]
        plain_s = best[(task, "plain")]
        n_plain = stats[(task, "plain")]["new_tokens"]
        results[task] = {"kind": kind, "plain_s": plain_s, "plain_tokens_per_s": n_plain / plain_s,
                         "new_tokens": n_plain, "prompt_tokens": len(prompts[task]),
                         "answer": stats[(task, "plain")]["text"], "draft_tokens": {}}
        for k in ks:
            s = stats[(task, k)]
            speedup = plain_s / best[(task, k)]
            results[task]["draft_tokens"][k] = {**s, "s": best[(task, k)], "speedup": speedup,
                                                "tokens_per_s": s["new_tokens"] / best[(task, k)]}
            rows.append([task, kind, k, len(prompts[task]), n_plain, f"{n_plain / plain_s:.1f}",
                         f"{s['new_tokens'] / best[(task, k)]:.1f}", f"{speedup:.2f}x", s["identical"],
                         f"{100 * s['acceptance']:.0f}%", f"{s['tokens_per_step']:.2f}"])
    def speedups(kind):
        return [results[t]["draft_tokens"][k]["speedup"] for t in results for k in ks if results[t]["kind"] == kind]

    grounded, opened = speedups("grounded"), speedups("open")
    identical = all(stats[(t, k)]["identical"] for t in prompts for k in ks)
    cost = verify_cost(config, params, ks, args.rounds * 5)
    print(f"Speculative decoding (prompt lookup), {pathlib.Path(checkpoint).name} float32 unscanned, batch 1, greedy, "
          f"max {n} new tokens; {_common.machine_line(info)}")
    print(f"best of {args.rounds} interleaved rounds; compilations during the timed rounds: {compilations}")
    print()
    print(_common.table(["task", "kind", "k", "prompt", "new tokens", "plain tok/s", "speculative tok/s", "speedup",
                         "identical", "acceptance", "tokens/step"], rows))
    print()
    if grounded:
        print(f"input-grounded: min speedup {min(grounded):.2f}x (target >= 2x: {_common.status(min(grounded) >= 2)})")
    if opened:
        print(f"open chat: min speedup {min(opened):.2f}x (target >= 0.9x: {_common.status(min(opened) >= 0.9)})")
    print(f"identical greedy output everywhere: {identical}")
    print("verify forward / decode step: " + ", ".join(f"k={k}: {cost[k] / cost[0]:.2f}x" for k in ks) +
          f" (decode step {cost[0] * 1e3:.1f} ms)")
    _common.write_json(args.json, {"benchmark": "speculative", "machine": info, "checkpoint": checkpoint,
                                   "max_new_tokens": n, "rounds": args.rounds,
                                   "compilations_after_warmup": compilations,
                                   "identical": identical, "results": results,
                                   "verify_s": {str(k): v for k, v in cost.items()},
                                   "samples_s": {f"{t}/{k}": v for (t, k), v in samples.items()}})


if __name__ == "__main__":
    main()
