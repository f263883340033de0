"""Stage ``evaluate``: perplexity on a text source; the number lands in the report row as ``ppl``.

The text is the bundled corpus (``corpus: enwiki`` + ``split``, the default: ``enwiki/test``), your own files
(``path``) or a ``datasets`` dataset (``dataset``); see :mod:`a3q.calib.sources`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from a3q.calib.sources import TextDemand, TextSourceFields
from a3q.calib.windows import sequential_windows
from a3q.metrics.layerwise import layerwise_scorer
from a3q.metrics.perplexity import perplexity
from a3q.registry import StageConfig, register_stage


class EvaluateConfig(StageConfig, TextSourceFields):
    """Perplexity over the first ``max_windows`` non-overlapping ``seq_len`` windows of a text source."""

    changes_model = False
    measures_quality = True
    default_split: ClassVar[str] = "test"

    seq_len: int = Field(512, ge=2)
    max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    #: feed each window in chunks of this many tokens through the model's KV cache (None: one forward pass);
    #: with a quantized cache this is what measures it, since only cached keys/values are ever quantized
    cache_chunk: int | None = Field(None, ge=1)

    def offload_problem(self) -> str | None:
        if self.cache_chunk is not None:
            return "cache_chunk runs the whole model through a KV cache: use offload: none, or drop cache_chunk"
        return None

    def text_demands(self, label: str) -> list[TextDemand]:
        return [TextDemand(f"{label}: max_windows", self.source(), self.max_windows or 1, self.seq_len)]


@register_stage("evaluate", EvaluateConfig)
def evaluate(graph, config: EvaluateConfig, context):
    windows = sequential_windows(graph.tokenizer, config.source(), config.seq_len, config.max_windows)
    result = perplexity(
        graph.model, windows, batch_size=config.batch_size, description=context.label, cache_chunk=config.cache_chunk,
        across_processes=True,  # data-parallel run: each process scores its share, the sums are reduced
        layerwise=layerwise_scorer(graph, config.batch_size, description=context.label),  # offloaded: by layer
    )
    context.metrics.update(
        ppl=result.perplexity,
        eval={
            **config.summary(),
            "seq_len": config.seq_len,
            "windows": result.windows,
            "predicted_tokens": result.predicted_tokens,
            "mean_nll": result.mean_nll,
            "cache_chunk": config.cache_chunk,
            "kv_cache": graph.kv_cache,
        },
    )
    return graph
