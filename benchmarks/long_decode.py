"""Decode step time at position 1k and at 16k with a 4k sliding window (ring cache of 4k slots both times).

    python benchmarks/long_decode.py [--checkpoint PATH | --preset NAME --layers N] [--window 4096]
        [--positions 1024,16384] [--json PATH]

The model is SmolLM2-135M's weights (float32), or with --preset a preset's shapes with random weights and
--layers of its layers (Mistral-7B's 32 do not fit a 24 GB machine in float32), with sliding_window=4096 and
max_seq_len=32768, so the rolling cache holds min(32768, 4096) = 4096 slots whatever the position. The cache
is filled directly, as a prefill of P tokens would leave it (prefilling 16k tokens takes minutes on a CPU):
slot s holds the position p < P with p mod 4096 == s among the last 4096 (empty, -1, when P < 4096), keys
and values random. Then `decoding.decode_step` runs greedy steps from position P; best of --rounds
interleaved runs of --steps steps. Both layer layouts: unscanned (what the CLI decodes with: one weight
buffer and one [B*K, S, D] cache buffer per layer, updated in place) and scanned (stacked layers under
nn.scan). For contrast, the same model without a window (a cache of P + 1024 slots; Mistral v0.2 is v0.1's
shapes without the window) at the largest position, in both layouts.
Compilations during the timed runs are counted (must be 0). The roofline is
(params + K and V cache) / read bandwidth, measured in the same run. Fresh memory per step: minor page
faults x page size during the last run, i.e. the buffers the step allocates and writes anew.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import mistral_jax as mj  # noqa: E402
from mistral_jax import decoding  # noqa: E402


def filled_cache(config, position: int, slots: int, seed: int = 0) -> dict:
    """A batch-1 cache as after `position` tokens: the last min(position, slots) positions in their ring slots."""
    cache = mj.init_cache(config, 1, slots)
    size = cache["pos"].shape[1]
    held = np.arange(max(0, position - size), position)
    pos = np.full((1, size), -1, np.int32)
    pos[0, held % size] = held
    leaves, treedef = jax.tree.flatten({"k": cache["k"], "v": cache["v"]})  # stacked or one buffer per layer
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    kv = jax.tree.unflatten(treedef, [jax.random.normal(key, a.shape, a.dtype) for key, a in zip(keys, leaves)])
    return {**kv, "pos": jnp.asarray(pos)}


class StepRunner:
    def __init__(self, config, params, cache, position: int, steps: int, step=None):
        self.step = step or functools.partial(decoding.decode_step, config, params)
        self.cache, self.steps = cache, steps
        self.token, self.position = jnp.zeros((1,), jnp.int32), jnp.full((1,), position, jnp.int32)
        self.run(1)  # compile

    def run(self, n):
        for _ in range(n):
            logits, self.cache = self.step(self.cache, self.token, self.position)
            self.token, self.position = jnp.argmax(logits, axis=-1).astype(jnp.int32), self.position + 1
        jax.block_until_ready(self.token)

    def __call__(self) -> float:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        self.run(self.steps)
        seconds = (time.perf_counter() - start) / self.steps
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        self.fault_bytes = faults * resource.getpagesize() / self.steps
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2-135M GGUF")
    parser.add_argument("--preset", default=None, help="instead of a checkpoint: a preset's shapes, random weights")
    parser.add_argument("--layers", type=int, default=2, help="with --preset: how many of its layers")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--max-seq-len", type=int, default=32768)
    parser.add_argument("--positions", default="1024,16384")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--no-contrast", action="store_true", help="skip the no-window run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = _common.machine()
    if args.preset:
        base = mj.ModelConfig.from_preset(args.preset, n_layers=args.layers)
        args.checkpoint, params = f"{args.preset} shapes, {args.layers} layers, random", mj.init_params(
            base, jax.random.key(0))
    else:
        args.checkpoint, base, params = _common.load_model(args.checkpoint)
    config = base.replace(sliding_window=args.window, max_seq_len=args.max_seq_len)
    positions = [int(p) for p in args.positions.split(",")]
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    layouts = {"unscanned": mj.unstack_layers(config, params), "scanned": (config, params)}
    runners, cache_bytes = {}, {}
    for layout, (cfg, p_) in layouts.items():
        for p in positions:
            cache = filled_cache(cfg, p, args.max_seq_len)
            name = f"{layout}, window {args.window}, position {p}"
            cache_bytes[name] = sum(x.nbytes for x in jax.tree.leaves({"k": cache["k"], "v": cache["v"]}))
            runners[name] = StepRunner(cfg, p_, cache, p, args.steps)
    if not args.no_contrast:
        top = max(positions)
        plain = base.replace(sliding_window=None, max_seq_len=max(base.max_seq_len, top + 1024))
        flat_config, flat_params = layouts["unscanned"]  # the same weights: a window is no parameter
        flat_plain = flat_config.replace(sliding_window=None, max_seq_len=plain.max_seq_len)
        unwindowed = {"unscanned": (flat_plain, flat_params), "scanned": (plain, params)}
        for layout, (cfg, p_) in unwindowed.items():
            cache = filled_cache(cfg, top, top + 1024)
            name = f"{layout}, no window (contrast), position {top}, {top + 1024} slots"
            cache_bytes[name] = sum(x.nbytes for x in jax.tree.leaves({"k": cache["k"], "v": cache["v"]}))
            runners[name] = StepRunner(cfg, p_, cache, top, args.steps)

    bandwidth = [_common.memory_bandwidth()]
    samples, compilations = _common.interleaved_rounds(runners, args.rounds)
    bandwidth.append(_common.memory_bandwidth())
    bw = max(b["best_bytes_per_s"] for b in bandwidth)
    best = {key: min(v) for key, v in samples.items()}
    def first_of(key):  # the same layout at the first position
        return f"{key.split(',')[0]}, window {args.window}, position {positions[0]}"

    ratios = {layout: best[f"{layout}, window {args.window}, position {positions[-1]}"] / best[first_of(layout)]
              for layout in layouts}
    ratio = ratios["unscanned"]
    rows, results = [], {}
    for key, seconds in best.items():
        roof = (param_bytes + cache_bytes[key]) / bw
        versus = seconds / best[first_of(key)]
        faults = runners[key].fault_bytes
        results[key] = {"s_per_step": seconds, "vs_first_position": versus, "cache_bytes": cache_bytes[key],
                        "roofline_s": roof, "page_fault_bytes_per_step": faults}
        rows.append([key, f"{cache_bytes[key] / 1e6:.0f} MB", f"{seconds * 1e3:.1f}", f"{versus:.2f}x",
                     f"{100 * roof / seconds:.0f}%", f"{faults / 1e6:.0f} MB"])
    model_name = args.checkpoint if args.preset else pathlib.Path(args.checkpoint).name
    print(f"Long decode, {model_name} float32 with sliding_window {args.window}, max_seq_len "
          f"{args.max_seq_len}; batch 1; {_common.machine_line(info)}")
    print(f"Read bandwidth {bw / 1e9:.1f} GB/s; parameters {param_bytes / 1e6:.0f} MB; "
          f"best of {args.rounds} interleaved runs of {args.steps} steps")
    print()
    print(_common.table(["decode_step", "K+V cache", "ms/step", f"vs position {positions[0]} (same code)",
                         "% of roofline", "fresh memory per step (page faults)"], rows))
    print()
    print(f"Position {positions[-1]} / position {positions[0]}, unscanned: {ratio:.2f}x (target <= 1.2x: "
          f"{_common.status(ratio <= 1.2)}); scanned: {ratios['scanned']:.2f}x; "
          f"compilations during the timed runs: {compilations}")
    _common.write_json(args.json, {"benchmark": "long_decode", "machine": info, "checkpoint": args.checkpoint,
                                   "window": args.window, "max_seq_len": args.max_seq_len, "param_bytes": param_bytes,
                                   "bandwidth": bandwidth, "bandwidth_bytes_per_s": bw, "ratio": ratio,
                                   "ratios": ratios,
                                   "compilations_after_warmup": compilations, "samples_s": samples,
                                   "results": results})


if __name__ == "__main__":
    main()
