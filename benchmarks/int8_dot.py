"""What an int8 matmul can gain over float32 on this CPU: SmolLM2-135M's decode matmuls alone, no model.

    python benchmarks/int8_dot.py [--preset smollm2-135m-instruct] [--rounds 5] [--json PATH]

Every large matmul of one decode step (per layer q, k, v, o, gate, up, down; then the tied LM head), with
random weights of the preset's shapes, measured in one run, interleaved, best of --rounds:
  - chained: each matmul's input is computed from the previous one's output, as in a forward pass;
      float32 at one row (what batch-1 decode runs); `linear.einsum` with quant_matmul="int8_dot" at one row
      (the model's kernel: activations quantized per row and tile, padded to two rows); int8 x int8 -> int32
      dots at two rows with activations quantized per row only (the cheapest activation quantization);
  - independent: every matmul reads the same input and the outputs are summed at the end, so nothing orders
      the dots and XLA:CPU may run them side by side; float32 at one row, int8 at two rows.
The int8 roofline is the int8 weight bytes over the read bandwidth measured in the same run. The CPU's int8
dot instructions (AVX-512 VNNI / AVX-VNNI) are listed from /proc/cpuinfo: without them, an int8 dot multiplies
through 16-bit intermediates at no more lanes per cycle than float32 FMAs.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

from mistral_jax.config import ModelConfig  # noqa: E402
from mistral_jax.model import linear, quant  # noqa: E402

INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw", "avx2")


def cpu_flags() -> list[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in INT8_FLAGS if f in have]
    except OSError:
        pass
    return []


def layer_shapes(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, contracted, output) of every matmul of one decode step, in order."""
    d, hd = config.dim, config.resolved_head_dim
    per_layer = [("wq", d, config.n_heads * hd), ("wk", d, config.n_kv_heads * hd), ("wv", d, config.n_kv_heads * hd),
                 ("wo", config.n_heads * hd, d), ("w_gate", d, config.hidden_dim), ("w_up", d, config.hidden_dim),
                 ("w_down", config.hidden_dim, d)]
    return per_layer * config.n_layers + [("embedding", d, config.vocab_size)]


def weights(shapes, seed: int = 0):
    """Float32 weights [K, N] (the tied head as [V, D]) and their int8 values and per-output-channel scales."""
    rng = np.random.default_rng(seed)
    out = []
    for name, k, n in shapes:
        shape = (n, k) if name == "embedding" else (k, n)
        w = jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.05)
        as_named = "embedding" if name == "embedding" else "w_up"  # 2-D [K, N]: contracted axis -2, as w_up's
        out.append((name, w, quant.QArray(*quant.quantize_array(as_named, w))))
    return out


def spec(name: str) -> str:
    return "btk,nk->btn" if name == "embedding" else "btk,kn->btn"


def _fit(y, width):
    """y [B, T, N] squashed to [B, T, width]: the next matmul's input (tiled or cut)."""
    reps = -(-width // y.shape[-1])
    return jnp.tanh(jnp.tile(y, (1, 1, reps))[..., :width])


def per_row_int8(name, x, w):
    """int8 x int8 -> int32 with one activation scale per row (two rows), then both scales."""
    xq, scale = quant.absmax_int8(x)
    acc = jnp.einsum(spec(name), xq, w.qvalue, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * scale * w.scale.reshape(1, 1, -1)


def chained(matmul, weight_index, layers):
    widths = [k for _, k, _ in layers[1:]] + [None]  # the next matmul's contracted width

    @jax.jit
    def run(ws, x):  # x [rows, 1, D]
        for (name, *_), w, width in zip(layers, ws, widths, strict=True):
            y = matmul(name, x, w[weight_index])
            x = y if width is None else _fit(y, width)
        return x
    return run


def independent(matmul, weight_index, layers):
    @jax.jit
    def run(ws, x):
        total = 0.0
        for (name, k, _), w in zip(layers, ws, strict=True):
            total = total + matmul(name, x[..., :k] if k <= x.shape[-1] else _fit(x, k), w[weight_index]).sum()
        return total
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="calls per measurement; the best is kept")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = _common.machine()
    config = ModelConfig.from_preset(args.preset)
    int8_config = config.replace(quant="int8", quant_matmul="int8_dot")
    layers = layer_shapes(config)
    ws = [(w, q) for _, w, q in weights(layers)]
    float_bytes = sum(w.nbytes for w, _ in ws)
    int8_bytes = sum(q.qvalue.nbytes + q.scale.nbytes for _, q in ws)
    bandwidth = _common.memory_bandwidth()["best_bytes_per_s"]

    def float_mm(name, x, w):
        return jnp.einsum(spec(name), x, w)

    def model_int8(name, x, w):
        return linear.einsum(spec(name), x, w, int8_config)

    d = config.dim
    one, two = jnp.full((1, 1, d), 0.1), jnp.full((2, 1, d), 0.1)
    cases = {  # name: (program, input, weight bytes read)
        "chained, float32, 1 row": (chained(float_mm, 0, layers), one, float_bytes),
        "chained, int8 model kernel (tiles of 64), 1 row": (chained(model_int8, 1, layers), one, int8_bytes),
        "chained, int8 x int8, scale per row, 2 rows": (chained(per_row_int8, 1, layers), two, int8_bytes),
        "independent, float32, 1 row": (independent(float_mm, 0, layers), one, float_bytes),
        "independent, int8 x int8, scale per row, 2 rows": (independent(per_row_int8, 1, layers), two, int8_bytes),
    }
    runners = {}
    for name, (fn, x, _) in cases.items():
        jax.block_until_ready(fn(ws, x))  # compile
        runners[name] = functools.partial(_common.best, functools.partial(fn, ws, x), args.repeats)
    samples, compilations = _common.interleaved_rounds(runners, args.rounds)
    seconds = {k: min(v) for k, v in samples.items()}
    base = seconds["chained, float32, 1 row"]
    rows, results = [], {}
    for name, (_, _, nbytes) in cases.items():
        s = seconds[name]
        results[name] = {"ms": s * 1e3, "vs_chained_float32": base / s, "weight_gb_per_s": nbytes / s / 1e9}
        rows.append([name, f"{s * 1e3:.1f}", f"{base / s:.2f}x", f"{nbytes / s / 1e9:.1f}",
                     f"{100 * nbytes / bandwidth / s:.0f}%"])
    flags = cpu_flags()
    print(f"int8 vs float32 matmuls of one {args.preset} decode step ({len(layers)} matmuls, random weights); "
          f"{_common.machine_line(info)}")
    print(f"int8 instructions: {', '.join(flags) or 'none listed'}; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"weights {float_bytes / 1e6:.0f} MB float32, {int8_bytes / 1e6:.0f} MB int8 + scales; "
          f"best of {args.rounds} interleaved rounds; compilations during the rounds: {compilations}\n")
    print(_common.table(["matmuls", "ms", "vs chained float32", "weight GB/s", "% of read bandwidth"], rows))
    _common.write_json(args.json, {"machine": info, "preset": args.preset, "cpu_int8_flags": flags,
                                   "bandwidth_bytes_per_s": bandwidth, "float_bytes": float_bytes,
                                   "int8_bytes": int8_bytes, "compilations": compilations, "results": results})


if __name__ == "__main__":
    main()
