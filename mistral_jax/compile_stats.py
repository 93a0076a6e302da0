"""Counting XLA compilations and their time, from jax's monitoring events.

"Compile once" is checked with it (tests, benchmarks) and the CLI reports speed with compilation apart.
"""

from __future__ import annotations

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
# Lowering happens even when the persistent compilation cache spares the backend compile.
LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"
TRACING = "/jax/core/compile/jaxpr_trace_duration"


class CompileStats:
    """While open (a context manager): `compilations` (backend compiles), `lowerings` and `seconds` spent
    tracing and compiling."""

    def __init__(self):
        self.compilations = self.lowerings = 0
        self.seconds = 0.0

    def _on_event(self, event: str, duration: float, **_) -> None:
        self.compilations += event == BACKEND_COMPILE
        self.lowerings += event == LOWERING
        if event in (BACKEND_COMPILE, TRACING):
            self.seconds += duration

    def __enter__(self) -> CompileStats:
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)
