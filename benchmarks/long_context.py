"""Long context: forward + backward time and memory of the exact and blockwise ("flash") attention paths, and a
32k-token prefill.

    python benchmarks/long_context.py [--lengths 2048,4096,8192,16384] [--prefill 32768] [--rounds 2] [--json PATH]
        [--chunk-preset mistral-7b-v0.2 --chunk-layers 1 --chunk-slots 8192,16384,32768]

The model is small and synthetic (--dim 256, 4 query heads over 2 KV heads of 64, 2 layers, float32), so that
attention dominates and the exact path still fits at 16k tokens on a 24 GB machine. For each length: the
jitted gradient of a mean-logit loss, its compiled temporary memory (`memory_analysis().temp_size_in_bytes`:
what XLA allocates beyond arguments and outputs) and its best time of --rounds interleaved runs. The ratios
are to the shortest length's, and flash against exact at the same length. Then `decoding.prefill` of
--prefill tokens in chunks of 512 into a cache of that many slots, with each kernel: tokens/s, and the
compiled chunk's temporary memory. Compilations during the timed runs are counted (must be 0). With
--chunk-preset: one 512-token prefill chunk of that preset's shapes (float32, --chunk-layers layers, unscanned),
compiled but not run, against caches of --chunk-slots slots: its temporary memory with each kernel, i.e.
whether a long prompt's prefill is bounded by the chunk or grows with the cache.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import mistral_jax as mj  # noqa: E402
from mistral_jax import decoding  # noqa: E402
from mistral_jax.compile_stats import CompileStats  # noqa: E402

MIB = 2**20


def model(args, max_seq_len: int):
    config = mj.ModelConfig(family="llama", vocab_size=512, dim=args.dim, n_layers=args.layers, n_heads=4,
                            n_kv_heads=2, head_dim=64, hidden_dim=2 * args.dim, max_seq_len=max_seq_len,
                            init_std=0.05, bos_id=1, eos_id=2)
    return config, mj.init_params(config, jax.random.key(0))


def train_step(config, params, length: int):
    """(compiled gradient of a mean-logit loss over one row of `length` tokens, its temporary bytes)."""
    tokens = jax.random.randint(jax.random.key(1), (1, length), 0, config.vocab_size)
    positions = jnp.arange(length, dtype=jnp.int32)[None]

    def loss(p):
        return jnp.mean(mj.forward(config, p, tokens, positions).logits)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return (lambda: compiled(params)), compiled.memory_analysis().temp_size_in_bytes


def train_steps(args, config, params, lengths: list[int], info: dict, results: dict) -> None:
    """Time and compiled memory of the exact and flash train steps at each length: printed, and into results."""
    runners, memory = {}, {}
    for length in lengths:
        for kind in ("xla", "flash"):
            runners[length, kind], memory[length, kind] = train_step(config.replace(attention=kind), params, length)
            jax.block_until_ready(runners[length, kind]())  # warm
    samples, compilations = _common.interleaved_rounds(runners, args.rounds, measure=lambda fn: _common.best(fn, 1))
    rows = []
    base = lengths[0]
    for length in lengths:
        cells = [length]
        for kind in ("xla", "flash"):
            seconds, temp = min(samples[length, kind]), memory[length, kind]
            results["train_step"][f"{kind}/{length}"] = {"seconds": seconds, "temp_bytes": temp,
                                                         "samples": samples[length, kind]}
            cells += [f"{seconds:.3f}", f"{temp / MIB:.0f}", f"{temp / memory[base, kind]:.1f}x"]
        cells.append(f"{min(samples[length, 'flash']) / min(samples[length, 'xla']):.2f}x")
        rows.append(cells)
    print(f"Long context, synthetic llama dim {args.dim}, {args.layers} layers, 4 heads / 2 KV heads of 64, "
          f"float32; {_common.machine_line(info)}")
    print(f"Forward + backward of one row; best of {args.rounds} interleaved rounds; temp = compiled temporary "
          f"memory; growth vs {base} tokens")
    print(_common.table(["tokens", "exact s", "exact temp MiB", "exact growth", "flash s", "flash temp MiB",
                         "flash growth", "flash / exact time"], rows))
    print(f"Compilations during the timed rounds: {compilations}")
    results["compilations"] = compilations


def chunk_memory(preset: str, layers: int, slots: list[int], chunk: int = 512) -> dict:
    """{kernel/slots: compiled temporary bytes of one prefill chunk reading a full cache of `slots` slots}."""
    results = {}
    for kind in ("xla", "flash"):
        config = mj.ModelConfig.from_preset(preset, n_layers=layers, attention=kind, max_seq_len=max(slots),
                                            scan_layers=False)  # float32: XLA:CPU copies bfloat16 weights to it
        params = jax.eval_shape(lambda c=config: mj.init_params(c, jax.random.key(0)))
        tokens = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
        for n in slots:
            cache = jax.eval_shape(lambda n=n, c=config: mj.init_cache(c, 1, n))
            compiled = decoding.prefill_chunk.lower(config, None, params, cache, tokens, tokens, False).compile()
            results[f"{kind}/{n}"] = compiled.memory_analysis().temp_size_in_bytes
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--prefill", type=int, default=32768, help="prompt tokens to prefill (0: skip)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk-preset", default=None, help="a preset whose prefill chunk memory to compile")
    parser.add_argument("--chunk-layers", type=int, default=1)
    parser.add_argument("--chunk-slots", default="8192,16384,32768")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",") if n]  # "": skip the train steps
    info = _common.machine()
    config, params = model(args, max(lengths + [args.prefill, 1]))

    results = {"machine": info, "args": vars(args), "train_step": {}, "prefill": {}}
    if lengths:
        train_steps(args, config, params, lengths, info, results)

    if args.prefill:
        prompt = np.asarray(jax.random.randint(jax.random.key(2), (1, args.prefill), 0, config.vocab_size))
        positions = np.arange(args.prefill, dtype=np.int32)[None]
        prefill_rows = []
        for kind in ("xla", "flash"):
            cfg = config.replace(attention=kind, scan_layers=False)
            flat_params = mj.unstack_layers(config, params)[1]

            def run(cfg=cfg, flat_params=flat_params):
                cache = mj.init_cache(cfg, 1, args.prefill)
                return decoding.prefill(cfg, flat_params, cache, prompt, positions, 512, cache_empty=True)[0]

            jax.block_until_ready(run())  # compiles both chunk programs
            with CompileStats() as compiled:
                start = time.perf_counter()
                jax.block_until_ready(run())
                seconds = time.perf_counter() - start
            chunk = decoding.prefill_chunk.lower(cfg, None, flat_params, mj.init_cache(cfg, 1, args.prefill),
                                                  prompt[:, :512], positions[:, :512], False).compile()
            temp = chunk.memory_analysis().temp_size_in_bytes
            results["prefill"][kind] = {"seconds": seconds, "tokens_per_s": args.prefill / seconds,
                                        "chunk_temp_bytes": temp, "compilations": compiled.compilations}
            prefill_rows.append([kind, f"{seconds:.1f}", f"{args.prefill / seconds:.0f}", f"{temp / MIB:.0f}",
                                 compiled.compilations])
        print(f"\nPrefill of {args.prefill} tokens in chunks of 512 (unscanned layout, one run after a warm one)")
        print(_common.table(["attention", "seconds", "tokens/s", "chunk temp MiB", "compilations"], prefill_rows))

    if args.chunk_preset:
        slots = [int(n) for n in args.chunk_slots.split(",")]
        results["chunk_memory"] = memory = chunk_memory(args.chunk_preset, args.chunk_layers, slots)
        print(f"\nOne 512-token prefill chunk of {args.chunk_preset} shapes ({args.chunk_layers} layer(s), float32, "
              f"unscanned) reading a full cache: compiled temporary memory, MiB")
        print(_common.table(["cache slots", "exact", "flash", "exact / flash"],
                            [[n, f"{memory[f'xla/{n}'] / MIB:.0f}", f"{memory[f'flash/{n}'] / MIB:.0f}",
                              f"{memory[f'xla/{n}'] / memory[f'flash/{n}']:.1f}x"] for n in slots]))
    _common.write_json(args.json, results)


if __name__ == "__main__":
    main()
