"""Quality metrics computed on real text."""

from a3q.metrics.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
