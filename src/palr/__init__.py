"""palr: Personalization Aware LLMs for Recommendation.

Three steps (profile, retrieve, rank) around honest, full-ranking evaluation.
Heavy dependencies (transformers, peft, fastapi) are imported lazily by the modules that need them.
"""

from __future__ import annotations

import os

# Before torch loads: OpenMP threads that busy-wait crawl (10x and worse) when another job shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["__version__"]
