"""Fine-tuning for mistral_jax models: SFT on JSONL chats and DPO on preference pairs, one program (an optax loop with
orbax checkpoints) around two objectives.

settings.py   every sft/dpo setting with its default and help; the flags and `resolve`
data.py       conversations -> token rows with loss weights on assistant tokens, packed or padded; grain streams
pairs.py      TRL's preference pairs -> a chosen and a rejected row each, weights on response tokens
objectives.py SFT's token cross-entropy, DPO's sigmoid/IPO loss and TRL's metrics
optim.py      AdamW with warmup + cosine decay, clipping, count-weighted gradient accumulation, the SFT loss
state.py      TrainState: step, trained part (params or LoRA adapters), optimizer state, frozen base params
loop.py       the jitted train step (sharded under a mesh), orbax checkpoints, metrics, SIGTERM and NaN handling
logging.py    metrics.jsonl, TensorBoard event files, W&B
plot.py       `mistral-jax plot`: a run's curves as a PNG
program.py    what sft and dpo share: settings -> model, data, trainer -> loop
sft.py, dpo.py the two commands; sft.latest_params for export
The run directory's files are mistral_jax/checkpoints/run_dir.py's; LoRA's math is mistral_jax/lora.py.
"""
