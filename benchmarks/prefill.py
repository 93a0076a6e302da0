"""Prefill of a 512-token prompt on SmolLM2-135M (float32, CPU): tokens/s and MFU against the matmul peak.

    python benchmarks/prefill.py [--checkpoint PATH] [--batches 1,4] [--length 512] [--json PATH]

Model FLOPs of one prefill of B rows of T tokens (what the prompt needs, not what the code executes):
    2 * P_layers * B * T                      every layer matmul (q, k, v, o, gate, up, down), per token
  + 2 * P_head * B                            the LM head, for the last token only (prefill returns it alone)
  + 4 * L * B * T^2 * H * hd / 2              attention: QK^T and PV, causal (half the square)
P_layers = params_active - embedding - norms (the table is a lookup, not a matmul). MFU = model FLOPs / time
/ peak, the peak being a jitted float32 2048^3 matmul measured in the same run (best of 7, before and
after). Measured, interleaved over --rounds rounds, best of each:
  - `decoding.prefill` into an empty cache, in the unscanned layout (what `mj.generate` and the CLI run:
    one 512-token chunk that attends to itself alone, causal query blocks, and is written to the cache);
  - the forward pass without a cache (`model.transformer.forward`, last_only, scanned layout): no cache
    reads or writes;
  - the same with attention replaced by the identity: the time attention takes is the difference.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import mistral_jax as mj  # noqa: E402
import mistral_jax.model.attention as attention_module  # noqa: E402
from mistral_jax import decoding  # noqa: E402
from mistral_jax.model.transformer import forward  # noqa: E402

ORIGINAL_ATTEND = attention_module.attend


def model_flops(config, batch: int, length: int) -> dict:
    counts = config.param_counts()
    embed = config.vocab_size * config.dim
    head = config.vocab_size * config.dim
    norms = config.n_layers * 2 * config.dim + config.dim
    layers = counts["active"] - embed * (1 if config.tie_embeddings else 2) - norms
    attn = 4 * config.n_layers * batch * length**2 * config.n_heads * config.resolved_head_dim / 2
    return {"layer_matmuls": 2 * layers * batch * length, "head": 2 * head * batch, "attention": attn,
            "total": 2 * layers * batch * length + 2 * head * batch + attn}


def no_attention(q, k, v, mask):
    return q


@contextlib.contextmanager
def patched_attend(fn):
    attention_module.attend = fn
    try:
        yield
    finally:
        attention_module.attend = ORIGINAL_ATTEND


def compiled_forward(config, params, tokens, positions, attend=None):
    """forward(last_only) compiled now (with `attend` swapped in while tracing) -> callable() -> logits."""
    fn = jax.jit(lambda p, t, q: forward(config, p, t, q, last_only=True).logits[:, 0])
    with patched_attend(attend or ORIGINAL_ATTEND):
        compiled = fn.lower(params, tokens, positions).compile()
    return lambda: compiled(params, tokens, positions)


class PrefillRunner:
    """decoding.prefill into an empty cache; `prepare` makes the cache (donated) before the clock starts."""

    def __init__(self, config, params, tokens, positions, slots):
        self.config, self.params, self.tokens, self.positions, self.slots = config, params, tokens, positions, slots
        self.prepare()
        self.prefill = functools.partial(decoding.prefill, config)
        self.logits = self()

    def prepare(self):
        self.cache = jax.block_until_ready(mj.init_cache(self.config, self.tokens.shape[0], self.slots))

    def __call__(self):
        logits, _ = self.prefill(self.params, self.cache, self.tokens, self.positions)
        return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2-135M GGUF")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    info = _common.machine()
    args.checkpoint, config, params = _common.load_model(args.checkpoint)
    slots = decoding.cache_length(config, args.length)

    runners, checks = {}, {}
    for batch in batches:
        ids = (np.arange(args.length)[None, :] * 37 + 11 + 101 * np.arange(batch)[:, None]) % config.vocab_size
        tokens = jnp.asarray(ids, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(args.length, dtype=jnp.int32), tokens.shape)
        prefill = PrefillRunner(*mj.unstack_layers(config, params), tokens, positions, slots)
        runners[batch, "decoding.prefill (empty cache)"] = prefill
        runners[batch, "forward, no cache"] = compiled_forward(config, params, tokens, positions)
        runners[batch, "forward, no cache, attention replaced by identity"] = compiled_forward(
            config, params, tokens, positions, no_attention)
        reference = runners[batch, "forward, no cache"]()
        scale = float(jnp.max(jnp.abs(reference)))
        checks[batch] = {"decoding.prefill": float(jnp.max(jnp.abs(prefill.logits - reference))) / scale}

    peaks = [_common.matmul_peak()]
    samples, compilations = _common.interleaved_rounds(runners, args.rounds, measure=lambda fn: _common.best(fn, 1))
    peaks.append(_common.matmul_peak())
    peak = max(peaks)

    rows, results = [], {}
    for batch in batches:
        flops = model_flops(config, batch, args.length)
        tokens = batch * args.length
        r = results[batch] = {"model_flops": flops, "checks": checks[batch], "runs": {}}
        attention_s = (min(samples[batch, "forward, no cache"])
                       - min(samples[batch, "forward, no cache, attention replaced by identity"]))
        r["attention_s"] = attention_s
        for (b, what), values in samples.items():
            if b != batch:
                continue
            seconds = min(values)
            counted = flops["total"] if "identity" not in what else flops["total"] - flops["attention"]
            mfu = counted / seconds / peak
            r["runs"][what] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "mfu": mfu}
            rows.append([batch, what, f"{seconds:.3f}", f"{tokens / seconds:.0f}", f"{100 * mfu:.0f}%"])
        rows.append([batch, f"attention share of the no-cache forward: {attention_s:.3f} s = "
                            f"{100 * attention_s / min(samples[batch, 'forward, no cache']):.0f}% of the time for "
                            f"{100 * flops['attention'] / flops['total']:.0f}% of the FLOPs", "", "", ""])
    print(f"Prefill, {pathlib.Path(args.checkpoint).name} float32, {args.length} tokens, cache {slots} slots; "
          f"{_common.machine_line(info)}")
    print(f"Matmul peak {peak / 1e9:.0f} GFLOP/s (float32 2048^3, best of 7, before and after); best of {args.rounds} "
          f"interleaved rounds; model GFLOP per row: {model_flops(config, 1, args.length)['total'] / 1e9:.1f} "
          f"(2 * P_layers * T + 2 * P_head + 4 * L * T^2 * H * hd / 2)")
    print()
    print(_common.table(["batch", "what", "seconds", "tokens/s", "MFU (identity row: without attention FLOPs)"], rows))
    print()
    print("Last-token logits, max |diff| / max |logit| against the no-cache forward: " + "; ".join(
        f"batch {b}: " + ", ".join(f"{k} {v:.0e}" for k, v in c.items()) for b, c in checks.items()))
    print(f"Compilations during the timed rounds: {compilations}")
    _common.write_json(args.json, {"benchmark": "prefill", "machine": info, "checkpoint": args.checkpoint,
                                   "length": args.length, "cache_slots": slots, "peaks_flop_per_s": peaks,
                                   "peak_flop_per_s": peak, "compilations_after_warmup": compilations,
                                   "samples_s": {f"{b} {k}": v for (b, k), v in samples.items()},
                                   "results": {str(b): r for b, r in results.items()}})


if __name__ == "__main__":
    main()
