"""Helpers shared by the benchmark scripts: machine description, timing, the memory-bandwidth and matmul
peaks measured in the same run (every figure a benchmark reports is a ratio to something measured beside
it), markdown tables and the `--json` output. Compilations are counted with
`mistral_jax.compile_stats.CompileStats`.

Not a module of the package: each script puts this directory on sys.path and imports it as `_common`.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parent.parent


def machine() -> dict:
    """Date, CPU, core count, load, versions and git commit: the header of every result."""
    cpu = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mistral_jax"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import flax

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "commit": commit,
    }


def machine_line(info: dict) -> str:
    return (f"{info['date_utc']}; {info['cpu']}, {info['nproc']} cores, load {info['load_average_1m']}; "
            f"{info['backend']}; jax {info['jax']}, flax {info['flax']}; commit {info['commit']}")


def times(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn (its result blocked on), after nothing: warm up yourself."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out


def best(fn: Callable[[], object], repeats: int) -> float:
    return min(times(fn, repeats))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def memory_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """Read bandwidth (bytes/s): a jitted sum over a `gib` GiB float32 array and a matvec over the same
    bytes as a [16384, n] matrix, best of `repeats` each. Both only read the array once; the array is far
    larger than any cache. 'best' is the larger of the two, the roofline's denominator."""
    n = int(gib * 2**30) // 4
    n -= n % 16384
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    # functools.partial, not lambdas: they would close over x and matrix, which `del` drops below
    sum_bw = x.nbytes / best(functools.partial(total, x), repeats)
    matrix = x.reshape(16384, -1)
    vec = jnp.ones((16384,), jnp.float32)
    matvec = jax.jit(lambda v, m: v @ m)
    matvec(vec, matrix).block_until_ready()
    matvec_bw = x.nbytes / best(functools.partial(matvec, vec, matrix), repeats)
    del x, matrix
    return {"sum_bytes_per_s": sum_bw, "matvec_bytes_per_s": matvec_bw, "best_bytes_per_s": max(sum_bw, matvec_bw)}


def matmul_peak(n: int = 2048, repeats: int = 7, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted n x n x n matmul, best of `repeats` (the denominator of every MFU)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    return 2 * n**3 / best(lambda: mm(a, b), repeats)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    if path:
        pathlib.Path(path).write_text(json.dumps(result, indent=2) + "\n")


def status(target_met: bool | None) -> str:
    return "n/a" if target_met is None else ("met" if target_met else "MISSED")


def load_model(checkpoint: str | None):
    """(checkpoint path as text, config, float32 params); the embedded SmolLM2 when `checkpoint` is None."""
    import mistral_jax as mj
    from mistral_jax.checkpoints import embedded

    checkpoint = checkpoint or str(embedded.default_model_path())
    config, params = mj.load(checkpoint, dtype="float32")
    return checkpoint, config, params


def interleaved_rounds(runners: dict, rounds: int, measure: Callable[[Callable], float] | None = None):
    """Every runner once per round, the runners interleaved so that a noisy moment hits them all alike.

    Returns ({key: [seconds per round]}, compilations during the rounds). `measure(fn)` turns a runner
    into seconds (default: the runner returns its own seconds); a runner with `prepare()` gets it first.
    """
    from mistral_jax.compile_stats import CompileStats

    samples = {key: [] for key in runners}
    with CompileStats() as stats:
        for _ in range(rounds):
            for key, fn in runners.items():
                if hasattr(fn, "prepare"):
                    fn.prepare()
                samples[key].append(measure(fn) if measure else fn())
    return samples, stats.compilations
