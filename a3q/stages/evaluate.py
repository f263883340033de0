"""Stage ``evaluate``: perplexity on a corpus split; the number lands in the report row as ``ppl``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from a3q.calib.corpus import CORPORA, SPLITS
from a3q.calib.windows import sequential_windows
from a3q.metrics.perplexity import perplexity
from a3q.registry import StageConfig, register_stage


class EvaluateConfig(StageConfig):
    """Perplexity over the first ``max_windows`` non-overlapping ``seq_len`` windows of a split."""

    measures_quality = True

    corpus: Literal[CORPORA] = "enwiki"  # type: ignore[valid-type]
    split: Literal[SPLITS] = "test"  # type: ignore[valid-type]
    seq_len: int = Field(512, ge=2)
    max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    #: feed each window in chunks of this many tokens through the model's KV cache (None: one forward pass);
    #: with a quantized cache this is what measures it, since only cached keys/values are ever quantized
    cache_chunk: int | None = Field(None, ge=1)


    def text_demands(self, label: str) -> list[tuple[str, str, str, int, int]]:
        return [(f"{label}: max_windows", self.corpus, self.split, self.max_windows or 1, self.seq_len)]


@register_stage("evaluate", EvaluateConfig)
def evaluate(graph, config: EvaluateConfig, context):
    windows = sequential_windows(graph.tokenizer, config.corpus, config.split, config.seq_len, config.max_windows)
    result = perplexity(
        graph.model, windows, batch_size=config.batch_size, description=context.spec.label, cache_chunk=config.cache_chunk
    )
    context.metrics.update(
        ppl=result.perplexity,
        eval={
            "corpus": config.corpus,
            "split": config.split,
            "seq_len": config.seq_len,
            "windows": result.windows,
            "predicted_tokens": result.predicted_tokens,
            "mean_nll": result.mean_nll,
            "cache_chunk": config.cache_chunk,
            "kv_cache": graph.kv_cache,
        },
    )
    return graph
