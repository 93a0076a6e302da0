"""SFT train step on SmolLM2-135M (float32, CPU) at sequence 512: tokens/s and MFU, remat off and on.

    python benchmarks/train_step.py [--checkpoint PATH] [--rows 1] [--seq-len 512] [--json PATH]

The step is the SFT package's own (`train.loop.Trainer.train_step`: forward, cross-entropy, gradient,
global-norm clipping and AdamW, state donated), on one micro-batch of --rows full rows (one segment each).
Model FLOPs of a step of B rows of T tokens (remat's recomputation is not counted):
    6 * (P_layers + P_head) * B * T          forward (2) and backward (4) of every matmul, LM head on every token
  + 3 * 4 * L * B * T^2 * H * hd / 2         attention QK^T and PV, causal, forward and backward
P_layers = matmul parameters of the blocks (embedding lookup and norms excluded). MFU = model FLOPs / time /
peak, the peak a jitted float32 2048^3 matmul measured in the same run (best of 7, before and after).
Compilations are counted (mistral_jax.compile_stats) over the timed steps, after one warm-up step: must be 0.
Where the time goes (same run, interleaved, best of --rounds): the forward alone (loss), forward + backward
(value_and_grad of the same loss), the same with attention replaced by the identity, and the optimizer
update alone. Attention without a cache runs in causal query blocks (`attention.attend_causal`: block i
against keys 0 .. its end only, exact for SFT rows, packed or not).
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402
from prefill import no_attention, patched_attend  # noqa: E402

import mistral_jax as mj  # noqa: E402
from mistral_jax.compile_stats import CompileStats  # noqa: E402
from mistral_jax.model.transformer import forward  # noqa: E402
from train.data import FIELDS  # noqa: E402
from train.loop import BatchShape, Trainer  # noqa: E402
from train.optim import OptimConfig, token_loss_sum  # noqa: E402


def model_flops(config, rows: int, length: int) -> dict:
    counts = config.param_counts()
    table = config.vocab_size * config.dim
    norms = config.n_layers * 2 * config.dim + config.dim
    layers = counts["active"] - table * (1 if config.tie_embeddings else 2) - norms
    attention = 3 * 4 * config.n_layers * rows * length**2 * config.n_heads * config.resolved_head_dim / 2
    matmuls = 6 * (layers + table) * rows * length
    return {"matmuls": matmuls, "attention": attention, "total": matmuls + attention}


def make_rows(config, rows: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (rows, length + 1), dtype=np.int32)
    out = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((rows, length), np.float32),
           "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
           "segment_ids": np.ones((rows, length), np.int32)}
    assert set(out) == set(FIELDS)
    return out


class StepRunner:
    """One Trainer (remat on or off, optionally traced with another attention), stepping its own state."""

    def __init__(self, config, params, rows, length, attend=None):
        optim = OptimConfig(learning_rate=1e-5, total_steps=1000, warmup_steps=10)
        self.trainer = Trainer(config, optim, BatchShape(grad_accum=1, rows=rows, seq_len=length))
        self.state = self.trainer.init_state(jax.tree.map(jnp.copy, params))
        self.batch = self.trainer.put_batch(make_rows(config, rows, length))
        start = time.perf_counter()
        with patched_attend(attend) if attend is not None else contextlib.nullcontext():
            jax.block_until_ready(self())  # compiles (traced now, with `attend` in place) and runs once
        self.first_call_s = time.perf_counter() - start
        self.metrics = None

    def __call__(self):
        self.state, self.metrics = self.trainer.train_step(self.state, self.batch)
        return self.metrics["loss"]


def sub_parts(config, params, rows, length):
    """Callables for the forward alone, forward + backward, the same without attention, and AdamW alone."""
    batch = {k: jnp.asarray(v) for k, v in make_rows(config, rows, length).items()}

    def loss(p, b):
        logits = forward(config, p, b["inputs"], b["positions"], b["segment_ids"]).logits
        return token_loss_sum(logits, b["targets"], b["weights"])[0]

    out = {}
    fwd = jax.jit(loss).lower(params, batch).compile()
    out["forward only (loss)"] = lambda: fwd(params, batch)
    grad = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
    out["forward + backward (value_and_grad)"] = lambda: grad(params, batch)
    with patched_attend(no_attention):
        grad_no_attn = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
    out["forward + backward, attention replaced by identity"] = lambda: grad_no_attn(params, batch)
    trainer = Trainer(config, OptimConfig(learning_rate=1e-5, total_steps=1000, warmup_steps=10),
                      BatchShape(grad_accum=1, rows=rows, seq_len=length))
    opt_state = jax.jit(trainer.optimizer.init)(params)
    grads = jax.tree.map(jnp.ones_like, params)

    def update(g, s, p):
        updates, s = trainer.optimizer.update(g, s, p)
        return optax.apply_updates(p, updates), s

    upd = jax.jit(update).lower(grads, opt_state, params).compile()
    out["optimizer update alone (clip + AdamW)"] = lambda: upd(grads, opt_state, params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2-135M GGUF")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-breakdown", action="store_true", help="skip the sub-part timings")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = _common.machine()
    if args.checkpoint is None:
        from mistral_jax.checkpoints import embedded

        args.checkpoint = str(embedded.default_model_path())
    config, params = mj.load(args.checkpoint, dtype="float32")
    tokens = args.rows * args.seq_len

    steps = {"train_step, remat off": StepRunner(config.replace(remat=False), params, args.rows, args.seq_len),
             "train_step, remat on": StepRunner(config.replace(remat=True), params, args.rows, args.seq_len)}
    runners = dict(steps)
    if not args.no_breakdown:
        runners.update(sub_parts(config, params, args.rows, args.seq_len))

    peaks = [_common.matmul_peak()]
    samples = {key: [] for key in runners}
    with CompileStats() as stats:
        for _ in range(args.rounds):
            for key, fn in runners.items():
                samples[key].append(_common.best(fn, 1))
    peaks.append(_common.matmul_peak())
    peak = max(peaks)
    flops = model_flops(config, args.rows, args.seq_len)
    losses = {k: float(s.metrics["loss"]) for k, s in steps.items()}

    rows, results = [], {}
    for key, values in samples.items():
        seconds = min(values)
        count = flops["total"] if key in steps or "backward" in key else None
        if key.startswith("forward only"):
            count = flops["total"] / 3
        if "identity" in key:
            count = flops["matmuls"]
        mfu = None if count is None else count / seconds / peak
        results[key] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "mfu": mfu}
        rows.append([key, f"{seconds:.3f}", f"{tokens / seconds:.0f}", "-" if mfu is None else f"{100 * mfu:.0f}%"])
    attention_s = None
    if not args.no_breakdown:
        attention_s = (results["forward + backward (value_and_grad)"]["seconds"]
                       - results["forward + backward, attention replaced by identity"]["seconds"])
    print(f"SFT train step, {pathlib.Path(args.checkpoint).name} float32, {args.rows} x {args.seq_len} tokens; "
          f"{_common.machine_line(info)}")
    print(f"Matmul peak {peak / 1e9:.0f} GFLOP/s (float32 2048^3, best of 7, before and after); best of {args.rounds} "
          f"interleaved rounds; model GFLOP per step {flops['total'] / 1e9:.0f} (6 * (P_layers + P_head) * B * T + "
          f"3 * 4 * L * B * T^2 * H * hd / 2; attention {100 * flops['attention'] / flops['total']:.0f}%)")
    print()
    print(_common.table(["what", "seconds", "tokens/s", "MFU (forward: 1/3 of the FLOPs; identity: matmul FLOPs)"],
                        rows))
    print()
    if attention_s is not None:
        fb = results["forward + backward (value_and_grad)"]["seconds"]
        print(f"Attention (forward + backward): {attention_s:.3f} s = {100 * attention_s / fb:.0f}% of "
              f"forward + backward for {100 * flops['attention'] / flops['total']:.0f}% of the FLOPs")
    print(f"Compilations during the timed steps (after one warm-up step each): {stats.compilations}; first call "
          f"(compile + one step) {steps['train_step, remat off'].first_call_s:.1f} s remat off, "
          f"{steps['train_step, remat on'].first_call_s:.1f} s remat on")
    print("Losses after the timed steps: " + ", ".join(f"{k}: {v:.4f}" for k, v in losses.items()))
    _common.write_json(args.json, {"benchmark": "train_step", "machine": info, "checkpoint": args.checkpoint,
                                   "rows": args.rows, "seq_len": args.seq_len, "model_flops": flops,
                                   "peaks_flop_per_s": peaks, "peak_flop_per_s": peak,
                                   "compilations_after_warmup": stats.compilations, "attention_s": attention_s,
                                   "losses": losses, "samples_s": samples, "results": results})


if __name__ == "__main__":
    main()
