"""Optional Triton import, so the torch references run on machines without Triton.

The CPU backend only ever calls the `*_ref` functions, but they live beside their Triton
kernels; importing a kernel file must therefore not require Triton. When it is missing,
`triton` and `tl` below are stand-ins that let `@triton.jit` functions be *defined* (never
launched): the decorator returns the function unchanged and `tl.constexpr` annotations resolve.
"""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on Triton-less installs
    HAS_TRITON = False

    class _Missing:
        """Absorbs attribute access and decoration; any real use fails at launch time."""

        def __getattr__(self, name: str) -> Any:
            return _Missing()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # bare @decorator
            return self  # decorator factory, e.g. @triton.jit(...)

    triton = _Missing()  # type: ignore[assignment]
    tl = _Missing()  # type: ignore[assignment]


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


__all__ = ["HAS_TRITON", "next_pow2", "tl", "triton"]
