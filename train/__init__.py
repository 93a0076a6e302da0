"""Supervised fine-tuning for mistral_jax models: JSONL chats -> packed batches -> an optax loop with orbax checkpoints.

data.py     conversations -> token rows with loss weights on assistant tokens, packed or padded, resumable
optim.py    AdamW with warmup + cosine decay, clipping, token-weighted gradient accumulation, the loss
state.py    TrainState: step, trained part (params or LoRA adapters), optimizer state, frozen base params
settings.py every sft setting with its default and help; the flags and `resolve`
loop.py     the jitted train step (sharded under a mesh), orbax checkpoints, metrics, SIGTERM and NaN handling
sft.py      the `mistral-jax sft` command and `latest_params` for export
The run directory's files are mistral_jax/checkpoints/run_dir.py's; LoRA's math is mistral_jax/lora.py.
"""
