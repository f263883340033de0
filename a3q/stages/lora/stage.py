"""Stage ``lora``: fine-tune a LoRA adapter through PEFT on the (compressed, possibly quantized) model.

```yaml
- stage: lora
  r: 8                     # adapter rank
  alpha: 16                # scaling alpha / r
  dropout: 0.0             # dropout on the adapter's input
  target_modules: null     # a3q short names (q, k, v, o, gate, up, down); default: every decoder linear
  lr: 1.0e-3               # AdamW, warm-up 5% then cosine to 10%, gradients clipped to norm 1
  steps: 300
  batch_size: 1
  seq_len: 256
  seed: 0                  # adapter init, window choice and order, dropout
  gradient_checkpointing: false
  merge: false             # true: merge into the float weights (refused after a quantizing stage)
  checkpoint_steps: 25     # in a recipe: save adapter, optimizer, schedule and RNG every 25 steps (0: never)
  corpus: enwiki           # the training text (or path / dataset, chat records: the calibration's fields);
  split: calib             #   a held-out split, or the text an earlier evaluate measures on, is refused
  loss: lm                 # lm | kd | kd+lm (distil the teacher's next-token distribution)
  teacher: input           # kd: 'input' (the recipe's model before any stage) or any model a recipe can load
  temperature: 1.0         # kd: softmax temperature of teacher and student (the loss is scaled by T²)
  kd_weight: 0.5           # kd+lm: kd_weight · kd + (1 − kd_weight) · lm
  teacher_top_k: 64        # kd: the teacher's top-k tokens per prediction, plus one bucket for the rest
  distill_layers: null     # kd: also match these decoder layers' outputs to the teacher's (MSE; off by default)
  distill_weight: 1.0      # kd: weight of that MSE
```

**Distillation** (``loss: kd`` or ``kd+lm``; :mod:`a3q.stages.lora.distill`): the student is trained towards the
teacher's next-token distribution, kept as its top-k probabilities plus the tail's mass as one extra bucket (an
exact KL over ``k + 1`` outcomes). The teacher runs once before training over the windows this process trains on;
its targets are cached as safetensors in ``OUT/lora-teacher/`` (outside a recipe: a temporary folder), under a hash
of the teacher, its dtype, ``k``, the temperature and the windows, so a resumed run reuses them
(:mod:`a3q.stages.lora.teacher`); then the teacher is freed, and training holds the student alone. The teacher's
vocabulary must be the model's, and ``teacher_top_k`` within it (checked at validation from config.json).

**Bases.** A float model (dense or A³-compressed): PEFT's LoRA ``Linear`` layers. A bitsandbytes 4/8-bit model
(``bnb`` stage): QLoRA, ``prepare_model_for_kbit_training`` then PEFT's bnb LoRA layers. A model quantized by a3q's
``gptq`` stage: its ``GPTQLinear`` is registered with PEFT as a custom module type (:mod:`a3q.io.peft_modules`),
so gradients reach the adapter through the dequantised weight. The adapter is trained in float32
(``autocast_adapter_dtype``); the base stays frozen.

**Stops.** In a recipe, training saves its state every ``checkpoint_steps`` steps in ``OUT/lora-state/``; a run
stopped during training and resumed (``--resume``) continues from the last save and ends with the adapter an
uninterrupted run gives, bit for bit on CPU (:mod:`a3q.stages.lora.training_state`).

**Merge.** ``merge: true`` folds ``B·A·alpha/r`` into the float weights (``merge_and_unload``): the model is a plain
model again, so ``a3 → lora(merge) → gptq`` fine-tunes in float and quantizes last. Quantized weights cannot absorb
an adapter, so ``merge: true`` after a quantizing stage fails at validation. ``merge: false`` keeps the adapter:
``graph.model`` is the causal LM with LoRA layers injected (so ``evaluate`` measures base + adapter) and
``graph.adapter`` the PeftModel; ``export`` writes the base artifact without LoRA keys and the adapter in PEFT's
format in ``adapter/`` (:mod:`a3q.io.adapter`). The model is adapted in place (as PEFT does).

**Data-parallel** (``a3q run RECIPE --nproc N``, torchrun): ``batch_size`` stays the global batch; each process
trains on its share of every step's windows under ``DistributedDataParallel`` (gloo on CPU, nccl on GPUs), so the
run trains as one process would (:mod:`a3q.stages.lora.data_parallel`; docs/distributed.md). ``batch_size`` must be
at least the number of processes. Only rank 0 shows progress; the report (rank 0's) adds ``world_size`` and
``rank_batch`` (windows per process and step) and ``adapter_repairs`` (0: the ranks' adapters agreed).

**Report row.** ``steps``, ``train_loss`` (mean of the last 10% of steps), ``loss_first``, ``loss_curve``,
``train_seconds``, ``seconds_per_step``, ``tokens``, ``trainable_params``, ``loss``; distilling also ``teacher``,
``teacher_top_k``, ``temperature``, ``teacher_seconds`` (0 when the cache was reused), ``teacher_cache``,
``teacher_cache_bytes``, ``teacher_cache_reused`` and ``teacher_tail_mass`` (the mean mass outside the top-k); when an ``evaluate`` stage comes before
this one, the engine repeats that evaluation after training (``trains`` on the config): ``ppl_before`` (that stage's
number) and ``ppl`` (after).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from a3q import distributed
from a3q.arch import LAYER_PREFIX, LINEAR_PATHS
from a3q.arch.surgery import with_separate_linears
from a3q.graph import ModelGraph
from a3q.io.adapter import with_adapter
from a3q.registry import register_stage
from a3q.stages.lora.config import INPUT_TEACHER, LoraConfig
from a3q.stages.lora.data_parallel import check_adapters_identical, seed_dropout_for_rank
from a3q.stages.lora.distill import Objective
from a3q.stages.lora.teacher import TeacherCache, TeacherSpec, teacher_cache
from a3q.stages.lora.train import batch_order, rank_rows, train, training_windows
from a3q.stages.lora.training_state import TrainingCheckpoint, training_checkpoint


def target_pattern(graph: ModelGraph, names: list[str] | None) -> str:
    """A regex (PEFT matches it in full against module names) for the chosen linears of every decoder layer."""
    paths = LINEAR_PATHS[graph.family]
    names = list(paths) if names is None else names
    unknown = [name for name in names if name not in paths]
    if unknown:
        raise ValueError(f"target_modules: {unknown} do not exist in a {graph.family} model (it has {list(paths)})")
    prefix = re.escape(LAYER_PREFIX[graph.family].split("{index}")[0]) + r"\d+\."
    return prefix + "(" + "|".join(re.escape(paths[name]) for name in names) + ")"


def uses_bitsandbytes(model: torch.nn.Module) -> bool:
    """Whether any module is a bitsandbytes 4/8-bit linear (then QLoRA preparation applies)."""
    return any(type(module).__module__.startswith("bitsandbytes") for module in model.modules())


def peft_lora_config(graph: ModelGraph, config: LoraConfig):
    """PEFT's LoraConfig for this stage, with a3q's custom quantized-linear types registered."""
    # deferred: PEFT (and a3q.io.peft_modules, which imports it) takes seconds to import; only training needs it
    from peft import LoraConfig as PeftLoraConfig

    from a3q.io.peft_modules import register_custom_modules  # deferred: imports PEFT

    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_pattern(graph, config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    register_custom_modules(peft_config, graph.model)
    return peft_config


def add_adapter(graph: ModelGraph, config: LoraConfig):
    """Wrap ``graph.model`` with a freshly initialised adapter (PEFT ``get_peft_model``); returns the PeftModel.

    Call inside the seeded RNG context: ``lora_A`` is initialised from torch's global generator.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training  # deferred: see peft_lora_config

    model = graph.model
    if uses_bitsandbytes(model):
        # QLoRA: freeze the base, cast non-quantized fp16/bf16 weights to fp32 (norms, embeddings)
        prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(model, peft_lora_config(graph, config), autocast_adapter_dtype=True)


@register_stage("lora", LoraConfig)
def lora(graph: ModelGraph, config: LoraConfig, context) -> ModelGraph:
    if graph.adapter is not None:
        raise ValueError("the model already carries an unmerged LoRA adapter; merge it first (merge: true)")
    graph = with_separate_linears(graph)
    label = context.label
    pool = training_windows(graph.tokenizer, config, config.seq_len, config.steps * config.batch_size, config.seed)
    distributed.check_same_everywhere(pool, f"{label}: the training windows")
    frozen = [(p, p.requires_grad) for p in graph.model.parameters()]
    model = graph.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        adapter = add_adapter(graph, config)
        if config.merge:  # fail before training, not after
            from a3q.io.peft_modules import quantized_targets  # deferred: imports PEFT (see peft_lora_config)

            unmergeable = quantized_targets(model)
            if unmergeable:
                raise ValueError(f"merge: the adapter cannot be merged into quantized weights, e.g. {unmergeable[0]}")
        teacher = distil_targets(graph, config, context, pool) if config.distils else None
        trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
        seed_dropout_for_rank(config.seed)  # after the adapter's init, which must be the same on every rank
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        generator = torch.Generator().manual_seed(config.seed)
        saves = training_state(config, context, pool, adapter)
        try:
            result = train(adapter, adapter.parameters(), pool, config.steps, config.batch_size, config.lr,
                           generator, description=label, progress=distributed.is_main(),
                           objective=Objective(config.loss, config.temperature, config.kd_weight,
                                               config.distill_weight),
                           teacher=teacher, layers=(model, graph.family, config.distill_layers)
                           if config.distill_layers else None, checkpoint=saves)
            if saves is not None:
                saves.remove()  # trained: the engine's checkpoint after this stage takes over
            repaired = check_adapters_identical(adapter, f"{label}: the trained adapter")
        finally:
            if config.gradient_checkpointing:
                model.gradient_checkpointing_disable()
            if hasattr(model, "disable_input_require_grads") and getattr(model, "_require_grads_hook", None) is not None:
                model.disable_input_require_grads()
    adapter.eval()
    for parameter in adapter.parameters():  # trained: the adapter is frozen like the base (as PEFT loads it)
        parameter.requires_grad_(False)
    if config.merge:
        merged = adapter.merge_and_unload()
        for parameter, flag in frozen:  # give the plain model back as it came (PEFT froze the base)
            parameter.requires_grad_(flag)
        graph = dataclasses.replace(graph, model=merged, adapter=None)
    else:
        graph = with_adapter(graph, adapter)
    metrics: dict[str, Any] = {
        "steps": result.steps,
        "train_loss": result.final_loss,
        "loss_first": result.losses[0],
        "loss_curve": result.curve(),
        "train_seconds": result.seconds,
        "seconds_per_step": result.seconds / result.steps,
        "tokens": result.tokens,
        "train_windows": result.windows,
        "trainable_params": trainable,
        "merged": config.merge,
        "loss": config.loss,
        **({} if teacher is None else teacher_metrics(config, teacher)),
    }
    if distributed.world_size() > 1:
        shares = distributed.WindowShares(config.batch_size, 1, distributed.world_size())
        metrics.update(world_size=shares.world, adapter_repairs=int(repaired),
                       rank_batch=[len(range(config.batch_size)[shares.windows_of(rank)]) for rank in range(shares.world)])
    note = f"r={config.r} {result.steps} steps, loss {result.losses[0]:.3f}→{result.final_loss:.3f}"
    context.metrics.update(metrics, note=note + (", merged" if config.merge else ""))
    return graph


def distil_targets(graph: ModelGraph, config: LoraConfig, context, pool: torch.Tensor) -> TeacherCache:
    """The teacher's cached targets for the pool rows this process trains on (computed, or read back from the run's
    ``lora-teacher/`` folder), inside a forked RNG: a cache hit and a miss leave the same random state for training.
    Outside a recipe (``apply_stage``) the cache lives in a temporary folder for the call."""
    if config.teacher == INPUT_TEACHER:
        if context.model is None:
            raise ValueError("teacher: 'input' needs the recipe's model; name the teacher's folder instead")
        spec = TeacherSpec(context.model, context.revision, context.dtype)
    else:
        spec = TeacherSpec(config.teacher, None, context.dtype)
    order = batch_order(pool.shape[0], config.steps, config.batch_size, torch.Generator().manual_seed(config.seed))
    device = next(graph.model.parameters()).device
    name = process_file_name(context.label)
    with ExitStack() as stack, torch.random.fork_rng(devices=[]):
        folder = Path(context.output_dir) / "lora-teacher" if context.recipe_raw else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="a3q-lora-teacher-")))
        cache = teacher_cache(spec, pool, rank_rows(order), config.teacher_top_k, config.temperature, folder, name,
                              device, config.distill_layers)
        if not context.recipe_raw:
            cache.path = None  # the temporary folder is gone after this call
    return cache


def process_file_name(label: str) -> str:
    """This stage's files in the run's folder, per process: ``stages-3-lora-rank0of2``."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-") or "lora"
    return name + f"-rank{distributed.rank()}of{distributed.world_size()}"


def training_state(config: LoraConfig, context, pool: torch.Tensor, adapter) -> TrainingCheckpoint | None:
    """Inside a recipe with ``checkpoint_steps``: where this process saves (and finds) its training state."""
    if not context.recipe_raw or config.checkpoint_steps == 0:
        return None
    name = process_file_name(context.label)
    settings = config.model_dump(mode="json", exclude={"checkpoint_steps", "merge"})
    return training_checkpoint(Path(context.output_dir) / "lora-state", name, config.checkpoint_steps, settings,
                               pool, adapter, adapter.named_parameters, distributed.rank(), distributed.world_size())


def teacher_metrics(config: LoraConfig, cache: TeacherCache) -> dict[str, Any]:
    """The report fields of a distilling run: the teacher, and what its cache cost and holds."""
    return {
        "teacher": config.teacher, "teacher_top_k": config.teacher_top_k, "temperature": config.temperature,
        **({"kd_weight": config.kd_weight} if config.loss == "kd+lm" else {}),
        **({"distill_layers": config.distill_layers, "distill_weight": config.distill_weight}
           if config.distill_layers else {}),
        "teacher_seconds": cache.seconds, "teacher_cache": str(cache.path) if cache.path else None,
        "teacher_cache_bytes": cache.bytes, "teacher_cache_reused": cache.reused,
        "teacher_tail_mass": float(cache.targets.tail.exp().mean()),
    }
