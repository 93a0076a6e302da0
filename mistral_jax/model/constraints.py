"""Sharding hints on activations, by logical axis name, resolved by whoever runs the model.

The model says what a dimension *is* (`constrain(x, ("batch", "length", "act_embed"))`); it never names a
mesh. `sharding.activations(mesh)` installs the resolver that turns those names into a sharding constraint
fitted to the array's own shape at trace time; without one (no mesh) a hint is a no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence

Resolver = Callable[[object, Sequence[str | None]], object]  # (array, logical names) -> constrained array
_RESOLVER: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("activation_resolver", default=None)


def constrain(x, names: Sequence[str | None]):
    """x, with the sharding its logical `names` map to under the active resolver (x itself without one)."""
    resolve = _RESOLVER.get()
    return x if resolve is None else resolve(x, tuple(names))


@contextlib.contextmanager
def resolving(resolver: Resolver | None):
    """Within this block (at trace time), `constrain` calls `resolver`; None turns hints off."""
    token = _RESOLVER.set(resolver)
    try:
        yield
    finally:
        _RESOLVER.reset(token)
