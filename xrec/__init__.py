"""xrec: a streaming, near-real-time cross-platform recommender (CLI + embedded stack)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
