"""Stage ``lm_eval``: EleutherAI's lm-evaluation-harness (0.4) on the model in memory.

```yaml
- stage: lm_eval
  tasks: [enwiki_rolling, enwiki_next_sentence]   # task names, as on lm_eval's command line (hub tasks too)
  include_path: tasks/          # a folder (or YAML file) of local task configs; relative to the working directory;
                                # task files may run Python (`!function`): trust them like remote code
  limit: 50                     # documents per task (int), or a fraction of them (float ≤ 1); default all
  batch_size: 1
  num_fewshot: 0                # default: each task's own
```

The model is handed to the harness as an object: its ``HFLM`` wraps ``graph.model`` and a copy of the tokenizer,
so whatever the earlier stages made of the model (A³ shapes, GPTQ or bitsandbytes linears, a LoRA adapter, a KV
cache setting) is what gets evaluated, with no export and no re-load. Tasks are resolved by the harness's
``TaskManager``: with ``include_path`` its YAMLs are indexed first, and the built-in task index (hub datasets:
``hellaswag``, ``arc_easy``, ``wikitext`` …) is only built when a requested name is not found there. A local task
over a JSON file (``dataset_path: json`` + ``dataset_kwargs.data_files``) runs offline.

The report row gets each task's metrics (``lm_eval: {task: {metric: value}}``, stderr where the harness gives one)
and a one-line note. Conventions to know when comparing with ``evaluate``: a ``loglikelihood_rolling`` task predicts
*every* token of each document, the first one from the tokenizer's BOS token (``prefix_token_id``), while
``evaluate`` scores fixed windows without a prefix and does not predict a window's first token; its perplexities
are per word / per byte, not per token.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.util
import math
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from a3q.registry import StageConfig, register_stage

#: what the harness is asked for, whatever the recipe says: no sample logs kept in memory, bounded bootstrap
BOOTSTRAP_ITERS = 1000


class LmEvalConfig(StageConfig):
    """Settings of the ``lm_eval`` stage; see the module docstring."""

    def offload_problem(self) -> str | None:
        return "lm-evaluation-harness runs the whole model: use offload: none"

    changes_model = False

    tasks: list[str] = Field(min_length=1)
    include_path: str | None = None
    limit: int | float | None = None
    batch_size: int = Field(1, ge=1)
    num_fewshot: int | None = Field(None, ge=0)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("task names must not be empty")
        if len(set(value)) != len(value):
            raise ValueError("each task may appear once")
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError("lm-evaluation-harness is not installed (pip install lm-eval==0.4.13)")
        return value

    @field_validator("include_path")
    @classmethod
    def _include_path(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().exists():
            raise ValueError(f"'{value}' does not exist (relative paths resolve against the working directory)")
        return value

    @model_validator(mode="after")
    def _known_tasks(self):  # noqa: ANN202 (pydantic returns the model)
        """Task names are resolved now, before any stage runs: a misspelt task must not fail after an hour of
        compression (and leave a checkpoint that the corrected recipe cannot resume)."""
        known = _known_task_names(self.include_path, tuple(self.tasks))
        unknown = [name for name in self.tasks if name not in known]
        if unknown:
            hints = [difflib.get_close_matches(name, known, n=1) for name in unknown]
            named = ", ".join(f"'{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                              for name, hint in zip(unknown, hints))
            where = f"in include_path '{self.include_path}' or " if self.include_path else ""
            raise ValueError(f"tasks: unknown task(s) {named}: not {where}among lm_eval's tasks")
        return self

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return value
        if isinstance(value, float) and not value.is_integer() and not 0.0 < value <= 1.0:
            raise ValueError(f"a fractional limit must lie in (0, 1], got {value}")
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return int(value) if isinstance(value, float) and value > 1 else value


def task_manager(include_path: str | None, tasks: list[str]) -> Any:
    """The harness's task index: only the local YAMLs when they define every requested task (fast, offline),
    else the built-in index as well."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(Path(include_path).expanduser().resolve()), include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
        return TaskManager(include_path=str(Path(include_path).expanduser().resolve()))
    return TaskManager()


@functools.lru_cache(maxsize=8)
def _known_task_names(include_path: str | None, tasks: tuple[str, ...]) -> frozenset[str]:
    """Every task, group and tag name the harness would resolve for ``tasks`` (building the built-in index takes
    seconds, so it is built once per process)."""
    return frozenset(task_manager(include_path, list(tasks)).all_tasks)


def wrap_model(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """``HFLM`` around the in-memory model. The tokenizer is copied: the harness sets a pad token on it."""
    from lm_eval.models.huggingface import HFLM

    model.eval()
    return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size)


def task_metrics(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the harness's results; ``acc,none`` → ``acc``, ``acc_stderr,none`` →
    ``acc_stderr`` (a filter other than ``none`` stays in the name); non-numeric and "N/A" entries and the sample
    count (in ``lm_eval_settings.n_samples``) are dropped."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name, _, filter_name = key.partition(",")
            metrics[name if filter_name in ("", "none") else f"{name},{filter_name}"] = float(value)
        table[task] = metrics
    missing = [task for task in tasks if task not in table]
    if missing:
        raise RuntimeError(f"lm_eval returned no results for {', '.join(missing)}")
    return table


def _headline(metrics: dict[str, float]) -> str:
    for name in ("acc_norm", "acc", "word_perplexity", "exact_match", "bits_per_byte"):
        if name in metrics and math.isfinite(metrics[name]):
            return f"{name} {metrics[name]:.4g}"
    name, value = next(((k, v) for k, v in metrics.items() if not k.endswith("_stderr")), ("-", math.nan))
    return f"{name} {value:.4g}"


def run_lm_eval(model: Any, tokenizer: Any, config: LmEvalConfig) -> dict[str, Any]:
    """Evaluate ``model`` on the config's tasks; returns the harness's result dict."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=wrap_model(model, tokenizer, config.batch_size),
        tasks=list(config.tasks),
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        task_manager=task_manager(config.include_path, config.tasks),
        log_samples=False,
        bootstrap_iters=BOOTSTRAP_ITERS,
    )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm_eval returned no results")
    return results


@register_stage("lm_eval", LmEvalConfig)
def lm_eval_stage(graph, config: LmEvalConfig, context):
    from importlib import metadata

    results = run_lm_eval(graph.model, graph.tokenizer, config)
    metrics = task_metrics(results, config.tasks)
    context.metrics.update(
        lm_eval=metrics,
        lm_eval_settings={
            "tasks": list(config.tasks),
            "limit": config.limit,
            "num_fewshot": config.num_fewshot,
            "n_samples": {task: value.get("effective", value.get("original"))
                          for task, value in results.get("n-samples", {}).items()},
            "versions": {task: version for task, version in results.get("versions", {}).items()},
            "lm_eval_version": metadata.version("lm_eval"),
        },
        note="; ".join(f"{task}: {_headline(values)}" for task, values in metrics.items()),
    )
    return graph
