"""unillava: LLaVA-1.5, ConvLLaVA and OMG-LLaVA in one codebase.

`unillava.load(path)` returns an `InferenceModel`; heavy imports wait until it is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["InferenceModel", "load", "__version__"]

if TYPE_CHECKING:
    from unillava.inference import InferenceModel, load


def __getattr__(name: str) -> Any:
    if name in ("InferenceModel", "load"):
        from unillava import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'unillava' has no attribute {name!r}")
