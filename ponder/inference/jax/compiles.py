"""How many times the engine's jitted functions traced (= compiled), process-wide, by name.

A warmed-up engine never traces again; tests and benchmarks read `TRACES` to prove it."""

from __future__ import annotations

from collections import Counter

import jax

__all__ = ["TRACES", "counted_jit"]

TRACES: Counter[str] = Counter()


def counted_jit(fn, name: str, **jit_kwargs):
    """`jax.jit(fn)` that adds 1 to TRACES[name] each time it traces a new shape signature."""

    def traced(*args, **kwargs):
        TRACES[name] += 1
        return fn(*args, **kwargs)

    traced.__name__ = name
    return jax.jit(traced, **jit_kwargs)
