"""Supervised fine-tuning for mistral_jax models: JSONL chats -> packed batches -> an optax loop with orbax checkpoints.

data.py   conversations -> token rows with loss weights on assistant tokens, packed or padded, resumable
optim.py  AdamW with warmup + cosine decay, clipping, token-weighted gradient accumulation, the loss
lora.py   low-rank adapters on the stacked attention / MLP weights, merged functionally
loop.py   the jitted train step (sharded under a mesh), orbax checkpoints, metrics, SIGTERM and NaN handling
sft.py    the `mistral-jax sft` command and `latest_params` for export
"""
