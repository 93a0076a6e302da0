"""`mistral-jax plot RUN [--out loss.png]`: a run's curves from its metrics.jsonl as one PNG (matplotlib), for
whoever has no TensorBoard (a Colab user): loss and eval loss, and for DPO the reward margins and accuracies."""

from __future__ import annotations

import argparse
import io
import json

from mistral_jax.checkpoints.run_dir import METRICS_FILE
from mistral_jax.errors import UserError
from mistral_jax.paths import as_path, path_arg

# (panel title, [(metrics.jsonl key, label)]): a panel is drawn when any of its keys was logged.
PANELS = (
    ("loss", [("loss", "train"), ("eval_loss", "eval")]),
    ("reward margin (chosen - rejected)", [("rewards/margins", "train"), ("eval_rewards/margins", "eval")]),
    ("reward accuracy", [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")]),
)


def read_metrics(run) -> list[dict]:
    """The records of RUN/metrics.jsonl (a line cut off by a killed run is skipped)."""
    file = as_path(run) / METRICS_FILE
    if not file.is_file():
        raise UserError(f"{run} has no {METRICS_FILE}: not a run directory, or nothing logged yet")
    records = []
    for line in file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curves(records: list[dict]) -> list[tuple[str, list[tuple[str, list[int], list[float]]]]]:
    """(title, [(label, steps, values)]) of each panel with data."""
    panels = []
    for title, keys in PANELS:
        lines = [(label, [r["step"] for r in records if key in r], [r[key] for r in records if key in r])
                 for key, label in keys]
        lines = [line for line in lines if line[1]]
        if lines:
            panels.append((title, lines))
    return panels


def plot(run, out=None) -> str:
    """Draw RUN's curves into `out` (default RUN/loss.png; local or a URL) -> where it went."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = curves(read_metrics(run))
    if not panels:
        raise UserError(f"{run}/{METRICS_FILE} has no loss logged yet")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, lines) in zip(axes[:, 0], panels):
        for label, steps, values in lines:
            ax.plot(steps, values, marker="o" if label == "eval" else None, markersize=3, label=label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    target = as_path(out) if out is not None else as_path(run) / "loss.png"
    target.write_bytes(buffer.getvalue())
    return str(target)


def add_plot_parser(subparsers) -> argparse.ArgumentParser:
    """The `plot` sub-command on a parser's subparsers (mistral_jax.cli calls this)."""
    parser = subparsers.add_parser("plot", help="draw a sft/dpo run's loss (and reward) curves into a PNG",
                                   description=__doc__.split("\n")[0])
    parser.add_argument("run", type=path_arg, metavar="RUN", help="run directory (local or gs://)")
    parser.add_argument("--out", type=path_arg, metavar="FILE.png", help="where to write (default RUN/loss.png)")
    return parser


def run(args: argparse.Namespace) -> None:
    """`mistral-jax plot`: draw and say where."""
    print(plot(args.run, args.out))
