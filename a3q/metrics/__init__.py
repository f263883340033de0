"""Quality metrics computed on real text (``perplexity``)."""
