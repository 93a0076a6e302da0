"""What a train step minimises: SFT's token cross-entropy, or DPO's preference loss against a reference model.

An objective turns one micro-batch's logits (and, for DPO, the reference model's) into sums that add up over
micro-batches and processes (train/optim.accumulate_gradients divides the gradient by the sum "count": target
tokens for SFT, preference pairs for DPO), and the sums into the metrics a step logs. DPO's names and formulas
are TRL's DPOTrainer's: per pair, logps are the response tokens' summed log-probabilities; rewards are
beta * (policy logps - reference logps); sigmoid loss -log sigmoid(beta * (chosen log-ratio - rejected
log-ratio)); IPO ((chosen log-ratio / its tokens - rejected log-ratio / its tokens) - 1 / (2 beta))^2.
A DPO batch holds each pair as two rows, chosen then rejected (train/pairs.py).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from mistral_jax.errors import UserError
from train.optim import token_loss_sum

DPO_LOSSES = ("sigmoid", "ipo")
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")  # means over pairs, named as TRL's DPOTrainer logs them


def token_logps(logits, targets):
    """log p(target) of each position, float32 whatever the compute dtype: logits [B, T, V], targets [B, T]."""
    return -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, T]


def sequence_logps(logits, targets, weights):
    """(summed log-probabilities of the weighted targets, their count) per row: [B] and [B]."""
    return jnp.sum(token_logps(logits, targets) * weights, axis=-1), jnp.sum(weights, axis=-1)


@dataclasses.dataclass(frozen=True)
class Sft:
    """Token-mean cross-entropy over the weighted (assistant) targets."""

    name: ClassVar[str] = "sft"
    rows_per_example: ClassVar[int] = 1  # rows one example occupies (at most: SFT packs several into a row)
    uses_reference: ClassVar[bool] = False
    log_keys: ClassVar[tuple[str, ...]] = ("loss", "target_tokens")
    eval_keys: ClassVar[tuple[str, ...]] = ("loss",)

    def count(self, batch):
        """What the objective averages over: the batch's target tokens (any leading dims)."""
        return jnp.sum(batch["weights"])

    def sums(self, logits, reference_logits, micro):
        """(objective summed over the micro-batch, sums to add up); reference_logits unused."""
        ce, tokens = token_loss_sum(logits, micro["targets"], micro["weights"])
        return ce, {"loss": ce, "count": tokens}

    def metrics(self, sums) -> dict:
        """Sums over a step (or the eval split) -> {"loss", "target_tokens"}."""
        return {"loss": sums["loss"] / jnp.maximum(sums["count"], 1.0), "target_tokens": sums["count"]}


def dpo_terms(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, beta: float,
              loss_type: str) -> dict:
    """Per pair [P]: the loss and TRL's metrics from summed logps of the policy and the reference."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        loss = -jax.nn.log_sigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":  # length-normalised log-ratios, as TRL (the IPO authors' normalised form)
        delta = chosen_ratio / jnp.maximum(chosen_tokens, 1.0) - rejected_ratio / jnp.maximum(rejected_tokens, 1.0)
        loss = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise UserError(f"unknown DPO loss {loss_type!r}; choose from {', '.join(DPO_LOSSES)}")
    chosen_rewards = beta * jax.lax.stop_gradient(chosen_ratio)
    rejected_rewards = beta * jax.lax.stop_gradient(rejected_ratio)
    return {"loss": loss, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": jax.lax.stop_gradient(chosen), "logps/rejected": jax.lax.stop_gradient(rejected)}


@dataclasses.dataclass(frozen=True)
class Dpo:
    """Pair-mean DPO loss (sigmoid or IPO) of the policy against the reference model's log-probabilities."""

    beta: float = 0.1
    loss_type: str = "sigmoid"

    name: ClassVar[str] = "dpo"
    rows_per_example: ClassVar[int] = 2  # chosen, then rejected
    uses_reference: ClassVar[bool] = True
    log_keys: ClassVar[tuple[str, ...]] = (*PAIR_METRICS, "target_tokens")
    eval_keys: ClassVar[tuple[str, ...]] = PAIR_METRICS

    def __post_init__(self):
        if self.loss_type not in DPO_LOSSES:
            raise UserError(f"unknown DPO loss {self.loss_type!r}; choose from {', '.join(DPO_LOSSES)}")
        if not self.beta > 0:
            raise UserError(f"DPO beta must be positive, got {self.beta}")

    def count(self, batch):
        """What the objective averages over: pairs whose chosen row has a target (padding pairs have none)."""
        return jnp.sum(jnp.sum(batch["weights"][..., 0::2, :], axis=-1) > 0).astype(jnp.float32)

    def sums(self, logits, reference_logits, micro):
        """(loss summed over the micro-batch's pairs, sums of every metric over them)."""
        logps, tokens = sequence_logps(logits, micro["targets"], micro["weights"])  # [2P]
        ref_logps, _ = sequence_logps(jax.lax.stop_gradient(reference_logits), micro["targets"], micro["weights"])
        terms = dpo_terms(logps[0::2], logps[1::2], ref_logps[0::2], ref_logps[1::2], tokens[0::2], tokens[1::2],
                          self.beta, self.loss_type)
        valid = (tokens[0::2] > 0).astype(jnp.float32)  # [P]
        sums = {k: jnp.sum(v * valid) for k, v in terms.items()}
        return sums["loss"], {**sums, "count": jnp.sum(valid), "target_tokens": jnp.sum(tokens)}

    def metrics(self, sums) -> dict:
        """Sums over a step (or the eval split) -> pair means of PAIR_METRICS, and the target tokens."""
        pairs = jnp.maximum(sums["count"], 1.0)
        return {**{k: sums[k] / pairs for k in PAIR_METRICS}, "target_tokens": sums["target_tokens"]}
