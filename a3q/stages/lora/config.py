"""The ``lora`` stage's config: adapter shape, training budget, training text, and the merge rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from a3q.assets.corpus import CORPORA, SPLITS
from a3q.calib.sources import TextDemand, TextSource
from a3q.registry import MAX_SEED, StageConfig
from a3q.stages.lora.data_parallel import batch_problem

if TYPE_CHECKING:
    from a3q.pipeline.plan import ModelShape

#: a3q's short names of a decoder layer's linears (see :data:`a3q.arch.LINEAR_PATHS`)
LinearName = Literal["q", "k", "v", "o", "gate", "up", "down"]


class LoraConfig(StageConfig):
    """LoRA through PEFT; see :mod:`a3q.stages.lora` for what each field does."""

    def offload_problem(self) -> str | None:
        return "training needs every layer in memory for the backward pass: use offload: none"

    accepts_factored_linears = False  # PEFT adapts nn.Linear (and quantized linears), not two-factor modules
    trains = True  # the engine repeats the recipe's last perplexity measurement after training

    r: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    #: which decoder linears get an adapter, by a3q's short names; None: all of them
    target_modules: list[LinearName] | None = Field(None, min_length=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    steps: int = Field(300, ge=1, le=1_000_000)
    batch_size: int = Field(1, ge=1, le=4096)
    seq_len: int = Field(256, ge=2, le=1_000_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    gradient_checkpointing: bool = False
    merge: bool = False
    corpus: Literal[CORPORA] = "enwiki"  # type: ignore[valid-type]
    split: Literal[SPLITS] = "calib"  # type: ignore[valid-type]

    @field_validator("split")
    @classmethod
    def _never_train_on_held_out_text(cls, split: str) -> str:
        if split != "calib":
            raise ValueError(f"'{split}' contains the held-out test articles; LoRA trains on 'calib' only")
        return split

    @field_validator("target_modules")
    @classmethod
    def _distinct(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError("each linear may appear once")
        return names

    def text_demands(self, label: str) -> list[TextDemand]:
        source = TextSource(corpus=self.corpus, split=self.split)
        return [TextDemand(f"{label}: seq_len", source, 1, self.seq_len)]  # the pool is reused when short

    def data_parallel_problem(self, world: int) -> str | None:
        """Why this stage cannot train in ``world`` processes (checked before the model loads): ``batch_size`` is
        the global batch, and every process needs at least one window of it per step."""
        return batch_problem(self.batch_size, world)

    def memory_estimate(self, model: ModelShape, calibration_seq_len: int) -> dict[str, int]:
        """A forward of the batch with its logits, and ``lora_training``: the adapter's weights, gradients and Adam
        state (16 bytes per trainable parameter) plus the activations kept for the backward pass (one layer input
        per layer with gradient checkpointing)."""
        h, i = model.hidden, model.intermediate
        trainable = model.layers * (self.r * (3 * h + i) * 3 + self.r * (h + i) * 4)
        per_layer = h if self.gradient_checkpointing else 6 * h + 3 * i
        kept = self.batch_size * self.seq_len * model.layers * per_layer * model.width
        return {"forward_workspace": model.forward_bytes(self.batch_size, self.seq_len, logits=True),
                "lora_training": 16 * trainable + kept}

    def memory_advice(self) -> list[str]:
        return [] if self.gradient_checkpointing else ["gradient_checkpointing: true on lora"]

    def keeps_adapter(self) -> bool:
        return not self.merge

    def check_in_recipe(self, earlier: list[Any]) -> list[str]:
        problems = []
        quantized = next((spec for spec in earlier if type(spec.config).produces_quantized_weights), None)
        if self.merge and quantized is not None:
            problems.append(
                f"merge: cannot merge the adapter into weights that {quantized.label} quantized; set merge: false "
                "(the adapter is kept and exported next to the quantized base) or put this stage before the quantization"
            )
        unmerged = next((spec for spec in earlier if spec.config.keeps_adapter()), None)
        if unmerged is not None:
            problems.append(
                f"the model already carries the unmerged adapter of {unmerged.label}; set merge: true there to stack adapters"
            )
        return problems
