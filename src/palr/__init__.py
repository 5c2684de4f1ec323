"""palr: Personalization Aware LLMs for Recommendation.

Three steps (profile, retrieve, rank) around honest, full-ranking evaluation.
Heavy dependencies (transformers, peft, fastapi) are imported lazily by the modules that need them.
Importing palr changes nothing in the process: the CLI applies thread settings (palr.console.setup).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
