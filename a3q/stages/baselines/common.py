"""What the low-rank baselines share: the two-factor module, the rank budget, input statistics, the swap.

Every baseline replaces a decoder linear ``y = x Wᵀ + b`` by two GEMMs ``y = (x Aᵀ) Bᵀ + b`` with
``A [k, in]`` and ``B [out, k]``. They differ only in how they pick ``A, B`` from ``W`` and the
statistics of ``x``, so the budget, the statistics pass and the module swap live here once, and a
comparison between baselines is a comparison of factorisations, nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from pydantic import Field, model_validator
from torch import Tensor

from a3q.arch import LAYER_PREFIX, LINEAR_PATHS, layer_linears
from a3q.arch.surgery import as_a3_graph, redescribe, swap_module
from a3q.distributed import reduce_together
from a3q.graph import ModelGraph
from a3q.modeling.a3q_factored_linear import LowRankLinear
from a3q.pipeline.runner import observe_layers
from a3q.pipeline.stage import CalibratingStage
from a3q.registry import StageConfig

FACTORIZED_CONFIG_KEY = "a3q_factorized"
"""Model-config attribute mapping a linear's module path to its factor rank (read back by the loader)."""

# Linears that read the same tensor share one statistic (q/k/v read the attention input, gate/up the MLP input).
_SHARED_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}


class BaselineConfig(StageConfig):
    """Budget shared by every low-rank baseline.

    ``ratio`` is the fraction of decoder linear weights removed, as for ``a3``: each linear
    ``[out, in]`` gets rank ``k = round((1 − ratio)·in·out / (in + out))`` (at most ``min(in, out)``).
    ``rank`` overrides that with one rank for every linear (clipped to ``min(in, out)``; tests use it).
    """

    needs_calibration = True
    requires_float_weights = True
    produces_factored_linears = True
    accepts_factored_linears = False  # one factorisation per model

    ratio: float | None = Field(None, ge=0.0, lt=1.0)
    rank: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _one_budget(self) -> BaselineConfig:
        if (self.ratio is None) == (self.rank is None):
            raise ValueError("set exactly one of ratio or rank")
        return self


def factor_rank(fan_in: int, fan_out: int, ratio: float) -> int:
    """The rank whose two factors hold ``(1 − ratio)`` of ``in·out`` weights, rounded to nearest, in [1, min]."""
    keep = (1.0 - ratio) * fan_in * fan_out / (fan_in + fan_out)
    return max(1, min(min(fan_in, fan_out), round(keep)))


@dataclass
class InputStatistics:
    """Per shared input: ``second_moment = E[x xᵀ]`` and ``mean_abs = E|x|`` (float64), over ``tokens`` tokens."""

    tokens: int = 0
    second_moment: Tensor | None = None
    mean_abs: Tensor | None = None

    def add(self, x: Tensor, moments: bool) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        self.tokens += flat.shape[0]
        abs_sum = flat.abs().sum(0)
        self.mean_abs = abs_sum if self.mean_abs is None else self.mean_abs + abs_sum
        if moments:
            square = flat.T @ flat
            self.second_moment = square if self.second_moment is None else self.second_moment + square

    @staticmethod
    def reduce_all(statistics: list[InputStatistics], reduce: Callable[[Tensor], Tensor]) -> None:
        """Sum the raw sums (``mean_abs``/``second_moment`` before :meth:`finish`) and token counts of
        ``statistics`` over every process in ONE ``reduce`` call."""
        if not statistics:
            return
        parts = [stats.mean_abs for stats in statistics] + [stats.second_moment for stats in statistics
                                                             if stats.second_moment is not None]
        if any(part is None for part in parts):
            raise RuntimeError("InputStatistics.reduce_all: a statistic saw no input (every process needs windows)")
        counts = torch.tensor([float(stats.tokens) for stats in statistics], dtype=torch.float64,
                              device=parts[0].device)
        *sums, tokens = reduce_together(parts + [counts], reduce)
        for stats in statistics:
            stats.mean_abs = sums.pop(0)
        for stats in statistics:
            if stats.second_moment is not None:
                stats.second_moment = sums.pop(0)
        for stats, count in zip(statistics, tokens.tolist()):
            stats.tokens = int(round(count))

    def finish(self) -> None:
        self.mean_abs = self.mean_abs / max(self.tokens, 1)
        if self.second_moment is not None:
            self.second_moment = self.second_moment / max(self.tokens, 1)


def register_input_hooks(graph: ModelGraph, index: int, stats: dict[str, InputStatistics], second_moments: bool) -> list:
    """Input hooks on layer ``index``'s linears filling ``stats`` (short name → statistics; shared inputs share one)."""
    handles = []
    shared: dict[str, InputStatistics] = {}
    for name, module in layer_linears(graph.model, graph.family, index).items():
        key = _SHARED_INPUT[name]
        if key not in shared:
            shared[key] = InputStatistics()
            hook = lambda module, args, s=shared[key]: s.add(args[0], second_moments)  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook))
        stats[name] = shared[key]
    return handles


def finish_statistics(stats: dict[str, InputStatistics]) -> None:
    for unique in {id(s): s for s in stats.values()}.values():
        unique.finish()


def collect_input_statistics(
    graph: ModelGraph, windows: Tensor, second_moments: bool, batch_size: int = 4, progress: bool = True
) -> list[dict[str, InputStatistics]]:
    """Every layer's input statistics from one pass of the engine's pipeline (for benchmarks and tests that sweep
    ratios over one set of statistics; the stages observe through the pipeline themselves)."""
    per_layer: list[dict[str, InputStatistics]] = [{} for _ in graph.layers]
    observe_layers(graph, windows, lambda g, i: register_input_hooks(g, i, per_layer[i], second_moments),
                   batch_size, progress, "input statistics")
    for stats in per_layer:
        finish_statistics(stats)
    return per_layer


Factorizer = Callable[[Tensor, InputStatistics, int], tuple[Tensor, Tensor]]
"""``(W [out, in] float64, statistics of x, rank) → (A [rank, in], B [out, rank])`` with ``W ≈ B A``."""


def split_singular(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced factors of a truncated SVD: ``A = √Σ_k Vᵀ_k``, ``B = U_k √Σ_k`` (equal scales suit low precision)."""
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def factor_layer(graph: ModelGraph, index: int, config: BaselineConfig, factorize: Factorizer,
                 statistics: dict[str, InputStatistics] | None,
                 factors_cache: dict[str, tuple[Tensor, Tensor]] | None = None) -> None:
    """Replace every linear of layer ``index`` by its two factors, in place.

    The factored ranks go into the model config (``a3q_factorized``), so that a3q's model classes rebuild the
    modules before loading the weights, and into the layer's ``factor_ranks`` so parameter counts are right.
    ``factors_cache`` (filled on first use) keeps each linear's full-rank factors: every baseline's rank-k factors
    are the first k rows / columns of them, so sweeping ratios costs one SVD per linear.
    """
    factored = dict(getattr(graph.model.config, FACTORIZED_CONFIG_KEY, None) or {})
    prefix = LAYER_PREFIX[graph.family].format(index=index)
    for name, linear in layer_linears(graph.model, graph.family, index).items():
        if isinstance(linear, LowRankLinear):
            raise TypeError(f"layer {index} {name} is already factored (one baseline per model)")
        fan_in, fan_out = linear.in_features, linear.out_features
        rank = factor_rank(fan_in, fan_out, config.ratio) if config.ratio is not None else min(config.rank, fan_in, fan_out)
        stats = None if statistics is None else statistics[name]
        path = prefix + LINEAR_PATHS[graph.family][name]
        if factors_cache is None:
            first, second = factorize(linear.weight.detach().double(), stats, rank)
        else:
            if path not in factors_cache:
                factors_cache[path] = factorize(linear.weight.detach().double(), stats, min(fan_in, fan_out))
            first, second = factors_cache[path][0][:rank], factors_cache[path][1][:, :rank]
        replacement = LowRankLinear.like(linear, rank)
        with torch.no_grad():
            replacement.first.weight.copy_(first)
            replacement.second.weight.copy_(second)
            if linear.bias is not None:
                replacement.second.bias.copy_(linear.bias)
        swap_module(graph.model, path, replacement)
        factored[path] = rank
        graph.layers[index].factor_ranks[name] = rank
    setattr(graph.model.config, FACTORIZED_CONFIG_KEY, factored)


def factorize_model(
    graph: ModelGraph,
    config: BaselineConfig,
    factorize: Factorizer,
    statistics: list[dict[str, InputStatistics]] | None,
    factors_cache: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> ModelGraph:
    """A factored copy of ``graph`` (the input is left untouched), from statistics already collected: for benchmarks
    that sweep ratios (see :func:`factor_layer` for ``factors_cache``). The stages factor in place instead."""
    copied = replace(graph, model=copy.deepcopy(graph.model), layers=copy.deepcopy(graph.layers),
                     history=list(graph.history))
    for index in range(len(copied.layers)):
        factor_layer(copied, index, config, factorize, None if statistics is None else statistics[index], factors_cache)
    return copied


class BaselineStage(CalibratingStage):
    """A low-rank baseline in the engine's pipeline: input statistics of each layer (from the model as the stage
    found it), then that layer's linears factored in place. Subclasses set :attr:`needs` and :meth:`factorize`."""

    #: the statistics the factorisation reads: None (no data), ``mean_abs`` or ``second_moment``
    needs: str | None = None
    statistics = "dense"
    resizes_layers = True

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__()
        self.config, self.batch_size = config, config.batch_size
        self.layer_statistics: dict[int, dict[str, InputStatistics]] = {}

    def factorize(self, weight: Tensor, statistics: InputStatistics | None, rank: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def calibrates(self) -> bool:
        return self.needs is not None

    def begin(self, graph: ModelGraph) -> ModelGraph:
        # a3q's own classes (same logits at full rank): separate q/k/v linears for GPT-2, and a model class whose
        # constructor rebuilds the factored linears, so the artifact loads right under trust_remote_code and cannot
        # be mistaken by plain transformers for a dense model with missing weights
        graph = as_a3_graph(graph)
        self.params_before = graph.decoder_linear_params()
        return graph

    def observe(self, graph: ModelGraph, index: int) -> list:
        self.layer_statistics[index] = {}
        return register_input_hooks(graph, index, self.layer_statistics[index], self.needs == "second_moment")

    def reduce_statistics(self, index: int, reduce) -> None:
        """The layer's input sums and token counts (each shared input once), summed over every process at once."""
        unique = {id(stats): stats for stats in self.layer_statistics[index].values()}
        InputStatistics.reduce_all(list(unique.values()), reduce)

    def process(self, graph: ModelGraph, index: int) -> None:
        statistics = self.layer_statistics.pop(index)
        finish_statistics(statistics)
        factor_layer(graph, index, self.config, self.factorize, statistics)

    def finish(self, graph: ModelGraph) -> ModelGraph:
        if not self.calibrates():  # data-free: every layer now
            for index in range(len(graph.layers)):
                factor_layer(graph, index, self.config, self.factorize, None)
        factored = redescribe(graph)
        params_after = factored.decoder_linear_params()
        ranks = sorted({rank for layer in factored.layers for rank in layer.factor_ranks.values()})
        achieved = 1 - params_after / self.params_before
        self.metrics.update(
            achieved_ratio=achieved,
            params_before=self.params_before,
            factor_ranks=dict(factored.layers[0].factor_ranks),
            note=f"ρ={achieved:.3f} ranks {ranks[0]}…{ranks[-1]}",
        )
        return factored
