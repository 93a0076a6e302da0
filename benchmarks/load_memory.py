"""Peak host memory of `mj.load` on a synthetic ~2 GB safetensors checkpoint.

    python benchmarks/load_memory.py [--gb 2] [--keep DIR] [--quantize int8]

Writes a random Llama-shaped HF directory (float32), then loads it in a fresh process and reports that
process's peak RSS next to the checkpoint size. Streaming loads keep the peak near one copy of the
model plus a leaf; a naive load (all tensors on the host, then copied to the device) needs about two.
--quantize int8 loads with mj.load(quantize="int8"), each leaf quantized as it is read.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import json, resource, sys, time
import jax
import mistral_jax as mj
start = time.perf_counter()
config, params = mj.load(sys.argv[1], quantize=None if sys.argv[2] == "none" else sys.argv[2])
jax.block_until_ready(params)
seconds = time.perf_counter() - start
param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "param_bytes": param_bytes, "seconds": seconds}))
"""


def write_checkpoint(directory: pathlib.Path, gigabytes: float) -> None:
    from safetensors.numpy import save_file

    import mistral_jax as mj
    from mistral_jax.checkpoints import hf

    dim, hidden, vocab = 2048, 5632, 32000
    per_layer = 4 * dim * dim + 3 * dim * hidden
    layers = max(1, round((gigabytes * 1e9 / 4 - 2 * vocab * dim) / per_layer))
    config = mj.ModelConfig(family="llama", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=16, n_kv_heads=16,
                            hidden_dim=hidden)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf.config_to_hf(config)))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                       p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                       p + "mlp.down_proj.weight": (dim, hidden)})
        shapes.update({p + f"self_attn.{w}_proj.weight": (dim, dim) for w in "qkvo"})
    names = sorted(shapes)
    for shard, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        save_file({n: rng.standard_normal(shapes[n], dtype=np.float32) * 0.02 for n in part},
                  directory / f"model-{shard + 1:05d}-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: f"model-{1 + (i >= len(names) // 2):05d}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--keep", type=pathlib.Path, default=None, help="write the checkpoint here and keep it")
    parser.add_argument("--quantize", default="none", help="int8: quantize as it loads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or pathlib.Path(tmp) / "ckpt"
        if not (directory / "config.json").is_file():
            write_checkpoint(directory, args.gb)
        size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", CHILD, str(directory), args.quantize], capture_output=True,
                             text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 1024**3
    print("| checkpoint | quantize | params | peak RSS | peak / params | peak / checkpoint | load time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {size / gib:.2f} GiB | {args.quantize} | {result['param_bytes'] / gib:.2f} GiB "
          f"| {result['peak_rss_bytes'] / gib:.2f} GiB | {result['peak_rss_bytes'] / result['param_bytes']:.2f}x "
          f"| {result['peak_rss_bytes'] / size:.2f}x | {result['seconds']:.1f} s |")
    print(json.dumps({"checkpoint_bytes": size, "quantize": args.quantize, **result}))


if __name__ == "__main__":
    main()
