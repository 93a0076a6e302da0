"""Decode tokens/s of SmolLM2-135M (float32, CPU) at batch 1 and 8: ours, transformers, and the roofline.

    python benchmarks/decode.py [--checkpoint PATH] [--batches 1,8] [--json PATH]

Measured in one run, so that every figure is a ratio to something measured beside it; every measurement
runs once per round, interleaved with the others, and the best of --rounds rounds is kept:
  - `mj.generate` (the on-device `lax.while_loop`): steady-state decode time per step is the difference
    between two generation lengths (--short, --long) over the extra steps, both warmed up first (one
    compilation each). Prefill and the first sample cancel out. On unscanned parameters
    (ModelConfig.scan_layers=False: one weight and cache buffer per layer) and on `mj.load(path)`'s own
    scanned ones, the default path a user takes: generate splits them once and keeps the split
    (decoding.decode_params), so it should run as fast as the unscanned row.
  - `decoding.decode_step` called from Python once per token (greedy), runs of --steps steps, both layouts
    (the scanned row is the scanned layout's own decode speed: stacked layers under nn.scan).
  - transformers' `generate` on the same weights (exported with `checkpoints.hf.write`; greedy,
    min_new_tokens = max_new_tokens), same difference of two lengths, in a child process so that the two
    thread pools never compete. Skipped, saying "transformers: not installed", without torch.
  - the roofline: bytes read per step (every parameter, plus the whole K and V cache, which attention
    reads in full) over the read bandwidth measured in the same run (`_common.memory_bandwidth`).
  - compilations during the timed rounds (must be 0), and the decode step's optimized HLO: how many
    per-layer weight slices XLA materialises inside the layer loop, and how many whole-cache copies.
  - --int8: also the int8 model (`mj.quantize`, unscanned, the CPU's int8 x int8 dots) and the same with an int8
    KV cache, against float32 `mj.generate` and their own roofline (int8 weights + scales + cache bytes).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import mistral_jax as mj  # noqa: E402
from mistral_jax import decoding  # noqa: E402

TRANSFORMERS_CHILD = r"""
import json, sys, time
import torch, transformers
directory, prompt_len = sys.argv[1], int(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                  "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:  # "batch new_tokens max_seconds" -> seconds of one greedy generate (inf if cut off)
    batch, n, max_time = int(line.split()[0]), int(line.split()[1]), float(line.split()[2])
    ids = (torch.arange(prompt_len)[None, :] * 37 + 11 + 101 * torch.arange(batch)[:, None]) % model.config.vocab_size
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, max_time=max_time)
    seconds = time.perf_counter() - start
    print(json.dumps(seconds if out.shape == (batch, prompt_len + n) else float("inf")), flush=True)
"""


class TransformersChild:
    """transformers' generate in a child process (its own thread pool), timed on request.

    torch's OpenMP threads spin at barriers: when another process holds a core, a generate call can take
    many times its usual time (RESULTS.md, Decode). Such calls are cut off (generate's max_time, at 3x the
    best time so far for the same request) and count as infinitely slow, so the best of the rounds ignores them.
    """

    def __init__(self, hf_dir, prompt_len: int):
        self.best: dict[tuple[int, int], float] = {}
        self.proc = subprocess.Popen([sys.executable, "-c", TRANSFORMERS_CHILD, str(hf_dir), str(prompt_len)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.versions = json.loads(self._read())

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"transformers child failed:\n{self.proc.stderr.read()[-3000:]}")
        return line

    def generate_seconds(self, batch: int, new_tokens: int) -> float:
        cap = 3 * self.best.get((batch, new_tokens), 100.0)
        self.proc.stdin.write(f"{batch} {new_tokens} {cap}\n")
        self.proc.stdin.flush()
        seconds = float(self._read())
        self.best[batch, new_tokens] = min(seconds, self.best.get((batch, new_tokens), seconds))
        return seconds

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def prompts_for(batch: int, length: int, vocab: int) -> np.ndarray:
    """Deterministic prompts, different per row (the same ids the transformers child builds)."""
    return (np.arange(length)[None, :] * 37 + 11 + 101 * np.arange(batch)[:, None]) % vocab


def kv_bytes(config, batch: int, slots: int, itemsize: int = 4) -> int:
    return 2 * config.n_layers * batch * slots * config.n_kv_heads * config.resolved_head_dim * itemsize


_greedy = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def prefilled(config, params, prompts: np.ndarray, slots: int):
    """(cache after the prompt, first greedy token, its position) as decode starts."""
    batch, length = prompts.shape
    cache = mj.init_cache(config, batch, slots)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), prompts.shape)
    logits, cache = decoding.prefill(config, params, cache, prompts, positions)
    return cache, _greedy(logits), jnp.full((batch,), length, jnp.int32)


def run_steps(step, cache, token, position, n: int):
    """n greedy steps through `step(cache, token, position) -> (logits, cache)`; returns the final state."""
    for _ in range(n):
        logits, cache = step(cache, token, position)
        token, position = _greedy(logits), position + 1
    return cache, token, position


def hlo_evidence(config, params, batch: int, slots: int) -> dict:
    """Counts in decode_step's optimized HLO: weight slices materialised per layer, whole-cache copies."""
    cache = mj.init_cache(config, batch, slots)
    ints = jnp.zeros((batch,), jnp.int32)
    text = decoding.forward_step.lower(config, None, params, cache, ints, ints).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    k, hd = config.n_kv_heads, config.resolved_head_dim
    if config.scan_layers:
        cache_shape = f"f32[{config.n_layers},{batch},{k},{slots},{hd}]"
    else:  # one buffer per layer: every copy of one counts
        cache_shape = f"f32[{batch * k},{slots},{hd}]"
    # Fusions that only slice one layer out of a stacked array write a copy of it: their output bytes, once per layer.
    sliced = [int(np.prod([int(d) for d in dims.split(",")])) * 4
              for dims in re.findall(r"^\s*%dynamic-slice\S*fusion\S* = f32\[([\d,]+)\]", text, re.M)]
    return {
        "dynamic_slice_fusions": len(sliced),
        "dynamic_slice_bytes_per_step": sum(sliced) * config.n_layers,
        "whole_cache_copies": len(re.findall(rf"^\s*%\S+ = {re.escape(cache_shape)}\S* copy\(", entry, re.M)),
        "whole_cache_broadcasts": len(
            re.findall(rf"^\s*%\S+ = {re.escape(cache_shape)}\S* fusion\(%constant", entry, re.M)),
    }


class StepRunner:
    """Greedy decode through `step(cache, token, position)`, continuing from its own state on every call."""

    def __init__(self, step, state, steps: int):
        self.step, self.state, self.steps = step, run_steps(step, *state, 1), steps  # first call compiles
        jax.block_until_ready(self.state)

    def __call__(self) -> float:
        """Seconds per step of `steps` pipelined steps."""
        start = time.perf_counter()
        self.state = run_steps(self.step, *self.state, self.steps)
        jax.block_until_ready(self.state)
        return (time.perf_counter() - start) / self.steps


def table_row(batch: int, hf_s: float | None, roof_s: float, what: str, seconds: float, extra: str = "") -> list:
    """One row of the decode table: seconds per step against transformers' (if measured) and the roofline."""
    return [batch, what, f"{seconds * 1e3:.1f}", f"{batch / seconds:.1f}",
            f"{hf_s / seconds:.2f}x" if hf_s else "-", f"{100 * roof_s / seconds:.0f}%", extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2-135M GGUF")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--short", type=int, default=8, help="the shorter generation (new tokens)")
    parser.add_argument("--long", type=int, default=40, help="the longer generation (new tokens)")
    parser.add_argument("--steps", type=int, default=12, help="decode_step calls per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="every measurement once per round; best of the rounds")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--int8", action="store_true", help="also the int8 model, with and without an int8 cache")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    info = _common.machine()

    args.checkpoint, config, params = _common.load_model(args.checkpoint)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    slots = decoding.cache_length(config, args.prompt_len + args.long)
    layouts = {"unscanned": mj.unstack_layers(config, jax.tree.map(jnp.copy, params)), "scanned": (config, params)}
    if args.int8:
        int8_config, int8_params = mj.quantize(*mj.unstack_layers(config, jax.tree.map(jnp.copy, params)))
        layouts["int8"] = int8_config, int8_params
        layouts["int8, int8 KV cache"] = int8_config.replace(kv_cache_dtype="int8"), int8_params
        int8_bytes = sum(x.nbytes for x in jax.tree.leaves(int8_params))

    hf = None
    if args.no_transformers:
        hf_note = "transformers: skipped (--no-transformers)"
    elif importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        hf_note = "transformers: not installed"
    else:
        from mistral_jax.checkpoints import hf as hf_checkpoint

        tmp = tempfile.TemporaryDirectory()
        hf_checkpoint.write(config, params, pathlib.Path(tmp.name) / "hf")
        hf = TransformersChild(pathlib.Path(tmp.name) / "hf", args.prompt_len)
        hf_note = (f"transformers {hf.versions['transformers']}, torch {hf.versions['torch']}, "
                   f"{hf.versions['threads']} threads (child process)")

    # Every measurement is a callable returning seconds; all of them run once per round, interleaved,
    # so that a burst of load from other processes hits them alike; the best of the rounds is kept.
    runners, results = {}, {}
    for batch in batches:
        r = results[batch] = {}
        prompts = prompts_for(batch, args.prompt_len, config.vocab_size)
        for n in (args.short, args.long):
            for layout, (cfg, p) in layouts.items():
                gen = functools.partial(mj.generate, cfg, p, prompts, n)
                gen()  # compile (max_new_tokens is static)
                runners[batch, f"generate {layout} {n}"] = functools.partial(_common.best, gen, 1)
            if hf is not None:
                hf.generate_seconds(batch, n)  # warm-up
                runners[batch, f"transformers {n}"] = functools.partial(hf.generate_seconds, batch, n)
        r["hlo"] = {}
        for layout, (cfg, p) in layouts.items():
            step = functools.partial(decoding.decode_step, cfg, p)
            runners[batch, f"decode_step {layout}"] = StepRunner(step, prefilled(cfg, p, prompts, slots), args.steps)
            r["hlo"][layout] = hlo_evidence(cfg, p, batch, slots)
        r["kv_bytes"] = kv_bytes(config, batch, slots)
        r["kv_bytes_int8"] = kv_bytes(config, batch, slots, itemsize=1) * (config.resolved_head_dim + 4) // (
            config.resolved_head_dim)

    bandwidth = [_common.memory_bandwidth()]
    samples, compilations = _common.interleaved_rounds(runners, args.rounds)
    bandwidth.append(_common.memory_bandwidth())
    if hf is not None:
        hf.close()
        tmp.cleanup()
    bw = max(b["best_bytes_per_s"] for b in bandwidth)
    best = {key: min(v) for key, v in samples.items()}

    rows = []
    for batch in batches:
        r = results[batch]
        roof_s = (param_bytes + r["kv_bytes"]) / bw
        r["roofline_s_per_step"] = roof_s
        extra_steps = args.long - args.short
        for layout in layouts:
            r[f"generate_{layout}_s_per_step"] = (best[batch, f"generate {layout} {args.long}"]
                                                  - best[batch, f"generate {layout} {args.short}"]) / extra_steps
            r[f"decode_step_{layout}_s_per_step"] = best[batch, f"decode_step {layout}"]
        r["generate_s_per_step"] = r["generate_unscanned_s_per_step"]  # what the CLI runs
        r["default_path_vs_unscanned"] = r["generate_unscanned_s_per_step"] / r["generate_scanned_s_per_step"]
        r["generate_tokens_per_s"] = batch / r["generate_s_per_step"]
        r["generate_pct_of_roofline"] = 100 * roof_s / r["generate_s_per_step"]
        first = results[batches[0]]
        r["generate_tokens_per_s_vs_batch_1"] = r["generate_tokens_per_s"] / first["generate_tokens_per_s"]
        hf_s = None
        if hf is not None:
            hf_s = (best[batch, f"transformers {args.long}"] - best[batch, f"transformers {args.short}"]) / extra_steps
            if math.isfinite(hf_s) and hf_s > 0:
                r["transformers_s_per_step"] = hf_s
                r["generate_vs_transformers"] = hf_s / r["generate_s_per_step"]
            else:  # every round of a length was cut off (see TransformersChild)
                hf_s = None
        row = functools.partial(table_row, batch, hf_s, roof_s)
        if args.int8:
            r["int8_roofline_s_per_step"] = (int8_bytes + r["kv_bytes"]) / bw
            r["int8_int8_kv_roofline_s_per_step"] = (int8_bytes + r["kv_bytes_int8"]) / bw
            for name, key in (("int8", "int8"), ("int8, int8 KV cache", "int8_int8_kv")):
                r[f"generate_{key}_vs_float32"] = r["generate_s_per_step"] / r[f"generate_{name}_s_per_step"]
                r[f"generate_{key}_pct_of_int8_roofline"] = (100 * r[f"{key}_roofline_s_per_step"]
                                                            / r[f"generate_{name}_s_per_step"])
                r[f"generate_{key}_tokens_per_s"] = batch / r[f"generate_{name}_s_per_step"]
        for layout in layouts:
            label = "mj.load(path) + mj.generate (default path)" if layout == "scanned" else f"mj.generate, {layout}"
            for what, key in ((f"{label} (while loop)", f"generate_{layout}_s_per_step"),
                              (f"decode_step, {layout} (one call per token)", f"decode_step_{layout}_s_per_step")):
                rows.append(row(what, r[key], f"{first[key] / r[key] * batch:.2f}x"))
        if hf_s and "transformers_s_per_step" in first:
            rows.append(row("transformers generate", hf_s, f"{first['transformers_s_per_step'] / hf_s * batch:.2f}x"))
        rows.append(row("roofline: (params + whole KV cache) / read bandwidth", roof_s))
        if args.int8:
            for key, what in (("int8", "int8 weights"), ("int8_int8_kv", "int8 weights and cache")):
                rows.append(row(f"roofline, {what}: (int8 params + scales + KV) / bandwidth",
                                r[f"{key}_roofline_s_per_step"],
                                f"mj.generate at {r[f'generate_{key}_pct_of_int8_roofline']:.0f}% of it, "
                                f"{r[f'generate_{key}_vs_float32']:.2f}x float32"))

    print(f"Decode, {pathlib.Path(args.checkpoint).name} float32, prompt {args.prompt_len}, {slots} cache slots; "
          f"{_common.machine_line(info)}")
    print(f"Read bandwidth {bw / 1e9:.1f} GB/s (best of sum / matvec over 1 GiB, before and after); parameters "
          f"{param_bytes / 1e6:.0f} MB; best of {args.rounds} interleaved rounds; {hf_note}")
    print()
    print(_common.table(["batch", "what", "ms/step", "tokens/s", "vs transformers", "% of roofline",
                         f"tokens/s vs batch {batches[0]}"], rows))
    print()
    evidence = []
    for batch in batches:
        for layout, h in results[batch]["hlo"].items():
            evidence.append([batch, layout,
                             f"{h['dynamic_slice_fusions']} ({h['dynamic_slice_bytes_per_step'] / 1e6:.0f} MB/step)",
                             h["whole_cache_copies"], h["whole_cache_broadcasts"],
                             f"{results[batch]['kv_bytes'] / 1e6:.0f} MB"])
    print(_common.table(["batch", "layout", "decode_step HLO: layer-slice fusions (bytes written per step)",
                         "whole-cache copies", "whole-cache zero fills", "KV cache"], evidence))
    print(f"\nCompilations during the timed rounds (generate, decode_step): {compilations}")
    _common.write_json(args.json, {"benchmark": "decode", "machine": info, "checkpoint": args.checkpoint,
                                   "param_bytes": param_bytes, "cache_slots": slots, "bandwidth": bandwidth,
                                   "bandwidth_bytes_per_s": bw, "transformers": None if hf is None else hf.versions,
                                   "compilations_after_warmup": compilations,
                                   "samples_s": {f"{b} {k}": v for (b, k), v in samples.items()},
                                   "results": {str(b): r for b, r in results.items()}})


if __name__ == "__main__":
    main()
