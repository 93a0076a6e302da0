"""Mistral-7B-shaped decode and prefill on one GPU (random weights, bfloat16) against the card's rooflines.

    python benchmarks/gpu.py [--preset mistral-7b-v0.1] [--layers N] [--batches 1,8] [--slots 1024]
                             [--lengths 512,2048] [--json PATH]

Ceilings, measured in the same run (before and after): HBM bandwidth = the larger of a read-only jitted sum
over 4 GiB of bfloat16 and a jitted `x + 1` over it counting bytes read + written (medians); matmul peak =
`_common.matmul_peak` in bfloat16 at 8192^3 (best of 20).
  - decode_step (one call per token, cache donated), scanned layout (stacked layers under nn.scan) and
    unscanned (one weight and cache buffer per layer), batch 1 and 8, prompt of 128 tokens in a cache of
    --slots slots. Roofline = (parameters + the whole K/V cache, which attention reads) / HBM bandwidth.
    The two layouts' logits are compared; compilations over the timed steps are counted (must be 0).
  - prefill of --lengths tokens (batch 1): the forward without a cache (last position's logits) with
    attention in XLA einsums (causal query blocks) and through `jax.nn.dot_product_attention`'s cuDNN
    kernel (ModelConfig.attention="cudnn"), logits compared; and `decoding.prefill` into an empty cache
    (XLA attention, which reads the whole cache beside the chunk). MFU = model FLOPs / time / matmul peak,
    model FLOPs = 2 * P_matmul * T + 2 * L * T^2 * H * hd (causal QK^T and PV) + the head for one token.
Off a GPU (to check the script) it runs on whatever backend jax has, cuDNN rows skipped.
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
from decode import kv_bytes  # noqa: E402
from prefill import model_flops  # noqa: E402

import mistral_jax as mj  # noqa: E402
from mistral_jax import decoding  # noqa: E402
from mistral_jax.compile_stats import CompileStats  # noqa: E402
from mistral_jax.model.transformer import forward  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    return _common.median(_common.times(fn, repeats))


def hbm_bandwidth(gib: float = 4.0, repeats: int = 20) -> dict:
    """Memory bandwidth (bytes/s, median): a read-only sum over `gib` GiB of bfloat16, and x + 1 over the
    same array counting bytes read + written. Decode reads its weights: the roofline takes the larger."""
    x = jax.random.normal(jax.random.key(0), (int(gib * 2**30) // 2,), jnp.bfloat16)
    add = jax.jit(lambda a: a + 1)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    add(x).block_until_ready()
    total(x).block_until_ready()
    # functools.partial, not lambdas: they would close over x, which `del` drops below
    out = {"read_bytes_per_s": gib * 2**30 / median_seconds(functools.partial(total, x), repeats),
           "copy_bytes_per_s": 2 * gib * 2**30 / median_seconds(functools.partial(add, x), repeats)}
    del x
    out["best_bytes_per_s"] = max(out.values())
    return out


def matvec_probe(dim: int, hidden: int, batches, n: int = 16, repeats: int = 20) -> list[dict]:
    """[B, dim] x [dim, hidden] bfloat16 matmuls against n separate weights in one jitted call (so that
    dispatch does not count): the weight bytes/s they reach, per batch size."""
    weights = [jax.random.normal(jax.random.key(10 + i), (dim, hidden), jnp.bfloat16) for i in range(n)]
    rows = []
    for batch in batches:
        x = jax.random.normal(jax.random.key(4), (batch, dim), jnp.bfloat16)
        mm = jax.jit(lambda a, ws: sum(jnp.einsum("bd,dh->bh", a, w, preferred_element_type=jnp.float32) for w in ws))
        mm(x, weights).block_until_ready()
        seconds = median_seconds(functools.partial(mm, x, weights), repeats)
        rows.append({"batch": batch, "us_per_matmul": round(seconds / n * 1e6, 1),
                     "weight_bytes_per_s": n * weights[0].nbytes / seconds})
    del weights
    return rows


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class Decoder:
    """decode_step over a prefilled cache, `steps` calls per timing; returns ms per step."""

    def __init__(self, config, params, batch: int, slots: int, prompt_len: int = 128):
        rng = np.random.default_rng(0)
        prompts = rng.integers(0, config.vocab_size, (batch, prompt_len))
        positions = np.broadcast_to(np.arange(prompt_len), (batch, prompt_len))
        cache = mj.init_cache(config, batch, slots)
        self.first_logits, self.cache = decoding.prefill(config, params, cache, prompts, positions)
        self.step = functools.partial(decoding.decode_step, config, params)
        self.tokens = jnp.asarray(np.argmax(np.asarray(self.first_logits), -1).astype(np.int32))
        self.position = prompt_len
        self.logits, self.cache = self.step(self.cache, self.tokens, jnp.full((batch,), self.position, jnp.int32))
        jax.block_until_ready(self.logits)

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.position += 1
            positions = jnp.full(self.tokens.shape, self.position, jnp.int32)
            self.logits, self.cache = self.step(self.cache, self.tokens, positions)
        jax.block_until_ready(self.logits)
        return (time.perf_counter() - start) / steps


def forward_fn(config, params, tokens):
    def last_logits(p, t):
        return forward(config, p, t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape), last_only=True).logits[:, 0]

    fn = jax.jit(last_logits)
    compiled = fn.lower(params, tokens).compile()
    return lambda: compiled(params, tokens)


_FORWARDS = {}


def lazy_forward(config, params, tokens):
    """forward_fn compiled on first call (so that a refused kernel fails inside the row's own try)."""
    key = (config, tokens.shape)
    if key not in _FORWARDS:
        _FORWARDS[key] = forward_fn(config, params, tokens)
    return _FORWARDS[key]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mistral-7b-v0.1")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (same shapes per layer)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--slots", type=int, default=1024)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--generate", type=int, default=0, help="also time mj.generate over this many extra tokens")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    info = _common.machine()
    info["device"] = jax.devices()[0].device_kind
    result = {"machine": info, "args": vars(args), "decode": [], "generate": [], "prefill": []}

    def emit(section, row):
        result[section].append(row)
        print(row, flush=True)
        _common.write_json(args.json, result)

    # The card idles at a low clock: the matmul goes first and warms it up; both ceilings are measured
    # again at the end, and the better of the two measurements is used.
    peak = _common.matmul_peak(8192 if on_gpu else 1024, 20, jnp.bfloat16)
    hbm = hbm_bandwidth(4.0 if on_gpu else 0.25)
    bandwidth = hbm["best_bytes_per_s"]
    result["hbm"], result["matmul_flops_per_s"] = hbm, peak
    print(f"{info['device']}: HBM read {hbm['read_bytes_per_s'] / 1e12:.2f} TB/s, copy (read + write) "
          f"{hbm['copy_bytes_per_s'] / 1e12:.2f} TB/s; bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)

    overrides = {"dtype": args.dtype, "param_dtype": args.dtype}
    if args.layers:
        overrides["n_layers"] = args.layers
    config = mj.ModelConfig.from_preset(args.preset, **overrides)
    start = time.perf_counter()
    params = jax.block_until_ready(mj.init_params(config, jax.random.key(0)))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    flat_config, flat_params = mj.unstack_layers(config, params)
    jax.block_until_ready(flat_params)
    print(f"{args.preset} x {config.n_layers} layers: {param_bytes / 1e9:.2f} GB of parameters, init + unstack "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    layouts = {"scanned": (config, params), "unscanned": (flat_config, flat_params)}
    result["matvec"] = matvec_probe(config.dim, config.hidden_dim, (1, 2, 8))
    for row in result["matvec"]:
        print(f"matmul [{row['batch']}, {config.dim}] x [{config.dim}, {config.hidden_dim}]: "
              f"{row['us_per_matmul']} us, {row['weight_bytes_per_s'] / 1e12:.2f} TB/s of weights", flush=True)

    # Decode ---------------------------------------------------------------------------------------
    for batch in [int(b) for b in args.batches.split(",") if b]:
        roofline_s = (param_bytes + kv_bytes(config, batch, args.slots, itemsize=2)) / bandwidth
        decoders, logits = {}, {}
        for name, (cfg, p) in layouts.items():
            start = time.perf_counter()
            decoders[name] = Decoder(cfg, p, batch, args.slots)
            logits[name] = decoders[name].logits
            decoders[name].compile_s = time.perf_counter() - start
        err = rel_error(logits["unscanned"], logits["scanned"])
        samples = {name: [] for name in decoders}
        with CompileStats() as compiled:
            for _ in range(args.rounds):
                for name, decoder in decoders.items():
                    samples[name].append(decoder.run(args.steps))
        for name, decoder in decoders.items():
            ms = 1e3 * _common.median(samples[name])
            emit("decode", {"batch": batch, "layout": name, "ms_per_step": round(ms, 3),
                            "tokens_per_s": round(batch * 1e3 / ms, 1),
                            "roofline_ms": round(roofline_s * 1e3, 3),
                            "pct_roofline": round(100 * roofline_s * 1e3 / ms, 1),
                            "first_call_s": round(decoder.compile_s, 1), "compilations_timed": compiled.compilations,
                            "logits_rel_err_vs_scanned": err})
        del decoders

    # generate (the on-device while loop) for one prompt, as the CLI runs it: decoding.MIN_DECODE_ROWS
    # pads it to two rows on a GPU; the same with the padding off. Per token: the difference of two lengths.
    if args.generate:
        prompt = [list(np.random.default_rng(2).integers(0, config.vocab_size, 128))]
        for label, rows in (("one prompt, padded to MIN_DECODE_ROWS", None), ("one prompt, one row", {})):
            saved = dict(decoding.MIN_DECODE_ROWS)
            if rows is not None:
                decoding.MIN_DECODE_ROWS.clear()
            try:
                seconds = {}
                for n in (16, 16 + args.generate):
                    mj.generate(flat_config, flat_params, prompt, n)  # compile
                    seconds[n] = median_seconds(lambda n=n: mj.generate(flat_config, flat_params, prompt, n), 3)
            finally:
                decoding.MIN_DECODE_ROWS.update(saved)
            ms = 1e3 * (seconds[16 + args.generate] - seconds[16]) / args.generate
            emit("generate", {"what": label, "ms_per_token": round(ms, 3), "tokens_per_s": round(1e3 / ms, 1)})

    # Prefill --------------------------------------------------------------------------------------
    for length in [int(n) for n in args.lengths.split(",") if n]:
        tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (1, length)), jnp.int32)
        flops = model_flops(config, 1, length)["total"]
        runs = {"forward, XLA attention": forward_fn(flat_config, flat_params, tokens)}
        if on_gpu:
            runs["forward, cuDNN attention"] = functools.partial(
                lazy_forward, flat_config.replace(attention="cudnn"), flat_params, tokens)
            if length > 512:
                runs["forward, cuDNN attention, scanned"] = functools.partial(
                    lazy_forward, config.replace(attention="cudnn"), params, tokens)
        ref = np.asarray(runs["forward, XLA attention"]())

        def into_cache(cfg=flat_config, p=flat_params, tokens=tokens, length=length):
            cache = mj.init_cache(cfg, 1, max(length, args.slots))
            return decoding.prefill(cfg, p, cache, tokens, jnp.arange(length)[None], chunk_size=length)[0]

        runs["decoding.prefill into the cache, XLA attention"] = into_cache
        for name, fn in runs.items():
            try:
                out = jax.block_until_ready(fn())  # warm-up (and compile, for the cache path)
            except Exception as error:  # noqa: BLE001 (a kernel this card or version refuses: say so, go on)
                print(f"{name}: {type(error).__name__}: {error}"[:2000], flush=True)
                result.setdefault("errors", []).append({"length": length, "what": name, "error": str(error)[:2000]})
                continue
            seconds = median_seconds(fn, args.rounds * 2)
            emit("prefill", {"length": length, "what": name, "ms": round(seconds * 1e3, 2),
                             "tokens_per_s": round(length / seconds), "mfu_pct": round(100 * flops / seconds / peak, 1),
                             "logits_rel_err_vs_xla": rel_error(out, ref)})

    peak_after = _common.matmul_peak(8192 if on_gpu else 1024, 20, jnp.bfloat16)
    hbm_after = hbm_bandwidth(4.0 if on_gpu else 0.25)
    result["ceilings_after"] = {"hbm": hbm_after, "matmul_flops_per_s": peak_after}
    print(f"ceilings again: HBM read {hbm_after['read_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"copy {hbm_after['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {peak_after / 1e12:.0f} TFLOP/s "
          "(the tables use the first measurement)")
    _common.write_json(args.json, result)
    print()
    print(f"{info['device']}, jax {info['jax']}; HBM {bandwidth / 1e12:.2f} TB/s, "
          f"bf16 matmul {peak / 1e12:.0f} TFLOP/s; "
          f"{args.preset} ({config.n_layers} layers, {param_bytes / 1e9:.2f} GB {args.dtype})")
    print(_common.table(["batch", "layout", "ms/step", "tokens/s", "% of roofline", "compilations (timed)"],
                        [(r["batch"], r["layout"], r["ms_per_step"], r["tokens_per_s"], r["pct_roofline"],
                          r["compilations_timed"]) for r in result["decode"]]))
    if result["generate"]:
        print(_common.table(["mj.generate", "ms/token", "tokens/s"],
                            [(r["what"], r["ms_per_token"], r["tokens_per_s"]) for r in result["generate"]]))
    print(_common.table(["tokens", "prefill", "ms", "tokens/s", "MFU %", "rel err vs XLA"],
                        [(r["length"], r["what"], r["ms"], r["tokens_per_s"], r["mfu_pct"],
                          f"{r['logits_rel_err_vs_xla']:.1e}") for r in result["prefill"]]))


if __name__ == "__main__":
    main()
