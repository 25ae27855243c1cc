"""unillava: LLaVA-1.5, ConvLLaVA and OMG-LLaVA in one codebase."""

from __future__ import annotations

__version__ = "0.1.0"
