"""The ``lora`` stage's config: adapter shape, training budget, training text, the loss (and its teacher), and the
merge rule. Everything checkable without loading a model is checked here (the teacher's vocabulary against the
recipe's model through their config.json files: :meth:`LoraConfig.model_problems`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from a3q.calib.sources import TextDemand, TextSourceFields
from a3q.io.model_folder import check_model_reference, config_json, text_field, tokenizer_vocabulary, vocab_size
from a3q.registry import MAX_SEED, StageConfig
from a3q.stages.lora.data_parallel import batch_problem
from a3q.stages.lora.teacher import LOGITS_BUDGET

if TYPE_CHECKING:
    from a3q.pipeline.plan import ModelShape

#: a3q's short names of a decoder layer's linears (see :data:`a3q.arch.LINEAR_PATHS`)
LinearName = Literal["q", "k", "v", "o", "gate", "up", "down"]
#: ``teacher: input``: the model the recipe loaded, as it was before any stage
INPUT_TEACHER = "input"
#: fields that only mean something when the loss distils from a teacher
KD_FIELDS = ("teacher", "temperature", "teacher_top_k", "distill_layers", "distill_weight")


class LoraConfig(StageConfig, TextSourceFields):
    """LoRA through PEFT; see :mod:`a3q.stages.lora` for what each field does. The training text is a text source
    with the calibration's fields (``corpus`` + ``split``, ``path`` or ``dataset``, chat records; see
    :mod:`a3q.calib.sources`), never a held-out split."""

    default_split: ClassVar[str] = "calib"

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
    #: in a recipe, save the training state every this many steps (OUT/lora-state/; 0: never), so a stopped run
    #: resumes training where it was (:mod:`a3q.stages.lora.training_state`)
    checkpoint_steps: int = Field(25, ge=0, le=1_000_000)
    #: ``lm``: next-token cross-entropy on the text; ``kd``: KL to the teacher's top-k distribution;
    #: ``kd+lm``: ``kd_weight · kd + (1 − kd_weight) · lm`` (:mod:`a3q.stages.lora.distill`)
    loss: Literal["lm", "kd", "kd+lm"] = "lm"
    #: ``input`` (the recipe's model as loaded, before any stage) or a model reference a recipe can load
    teacher: str = Field(INPUT_TEACHER, min_length=1, max_length=4096)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    kd_weight: float = Field(0.5, gt=0.0, lt=1.0)
    #: the teacher's k most likely tokens per prediction are kept, the rest is one tail bucket
    teacher_top_k: int = Field(64, ge=1, le=1_000_000)
    #: also match the student's outputs of these decoder layers to the teacher's (MSE; :mod:`.hidden`); off: None
    distill_layers: list[int] | None = Field(None, min_length=1, max_length=1024)
    #: weight of that hidden-state MSE against the kd (or kd+lm) loss
    distill_weight: float = Field(1.0, gt=0.0, le=1e6)

    @field_validator("split")
    @classmethod
    def _never_train_on_held_out_text(cls, split: str | None) -> str | None:
        if split is not None and split != "calib":
            raise ValueError(f"'{split}' contains the held-out test articles; LoRA trains on 'calib' only")
        return split

    @field_validator("distill_layers")
    @classmethod
    def _layer_indices(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (len(set(layers)) != len(layers) or min(layers) < 0):
            raise ValueError("each layer index may appear once and must be ≥ 0")
        return layers

    @field_validator("teacher")
    @classmethod
    def _teacher_exists(cls, teacher: str) -> str:
        if teacher != INPUT_TEACHER:
            problem = check_model_reference(teacher)
            if problem:
                raise ValueError(problem)
        return teacher

    @model_validator(mode="after")
    def _teacher_fields_need_a_teacher(self):  # noqa: ANN202 (pydantic returns the model)
        if "distill_weight" in self.model_fields_set and self.distill_layers is None:
            raise ValueError("distill_weight: only applies with distill_layers")
        if self.loss == "lm":
            given = [name for name in (*KD_FIELDS, "kd_weight") if name in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]}: only applies to loss: kd or kd+lm (this stage trains with loss: lm)")
        elif self.loss == "kd" and "kd_weight" in self.model_fields_set:
            raise ValueError("kd_weight: only applies to loss: kd+lm (loss: kd is the distillation loss alone)")
        return self

    @property
    def distils(self) -> bool:
        return self.loss != "lm"

    def model_problems(self, model: str, revision: str | None) -> list[str]:
        """The teacher against the recipe's ``model``, from the config.json of both (nothing loads): the same
        vocabulary (the KD loss compares distributions token by token), and ``teacher_top_k`` within it."""
        if not self.distils:
            return []
        student_config = config_json(model, revision)
        teacher_config = student_config if self.teacher == INPUT_TEACHER else config_json(self.teacher)
        student, teacher = vocab_size(student_config), vocab_size(teacher_config)
        if teacher is not None and student is not None and teacher != student:
            return [f"teacher: '{self.teacher}' has a vocabulary of {teacher:,} tokens, the model '{model}' "
                    f"{student:,}; distillation compares them token by token and needs the same tokenizer"]
        if self.teacher != INPUT_TEACHER and (problem := self._tokenizer_problem(model, revision)):
            return [problem]
        if teacher is not None and self.teacher_top_k > teacher:
            return [f"teacher_top_k: {self.teacher_top_k:,} is larger than the teacher's vocabulary "
                    f"({teacher:,} tokens)"]
        return self._layer_problems(model, student_config, teacher_config)

    def _tokenizer_problem(self, model: str, revision: str | None) -> str | None:
        """The same vocabulary size is not the same tokenizer: the first token id the two tokenizer.json files
        map to different tokens (checked only where both are on disk; the tokens are compared, not the bytes)."""
        student, teacher = tokenizer_vocabulary(model, revision), tokenizer_vocabulary(self.teacher)
        if student is None or teacher is None or student == teacher:
            return None
        index = min(i for i in student.keys() | teacher.keys() if student.get(i) != teacher.get(i))
        return (f"teacher: '{self.teacher}' has another tokenizer than the model '{model}': token id {index:,} is "
                f"{teacher.get(index)!r} there and {student.get(index)!r} in the model; distillation compares "
                "them token by token and needs the same tokenizer")

    def _layer_problems(self, model: str, student: dict | None, teacher: dict | None) -> list[str]:
        """``distill_layers`` against both models' depth and width (config.json)."""
        if not self.distill_layers:
            return []
        for name, config in ((f"the model '{model}'", student), (f"the teacher '{self.teacher}'", teacher)):
            depth = text_field(config, "num_hidden_layers")
            if depth is not None and max(self.distill_layers) >= depth:
                return [f"distill_layers: {name} has {depth} decoder layers (0 … {depth - 1}); "
                        f"{max(self.distill_layers)} is not one"]
        widths = text_field(student, "hidden_size"), text_field(teacher, "hidden_size")
        if None not in widths and widths[0] != widths[1]:
            return [f"distill_layers: the teacher's hidden size {widths[1]} differs from the model's {widths[0]}; "
                    "hidden states can only be matched at the same width"]
        return []

    @field_validator("target_modules")
    @classmethod
    def _distinct(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError("each linear may appear once")
        return names

    def text_demands(self, label: str) -> list[TextDemand]:
        return [TextDemand(f"{label}: seq_len", self.source(), 1, self.seq_len)]  # the pool is reused when short

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
        estimate = {"forward_workspace": model.forward_bytes(self.batch_size, self.seq_len, logits=True),
                    "lora_training": 16 * trainable + kept}
        if self.distils:
            estimate["lora_teacher"] = self.teacher_bytes(model)
        return estimate

    def teacher_bytes(self, model: ModelShape) -> int:
        """Distilling: the teacher's weights and logits while it runs (its shape taken as the model's: the same
        vocabulary, and a teacher of another size is a guess either way) plus the cached targets kept through
        training. Counted on top of training, though the teacher is freed before it: an over-estimate by design."""
        h, i = model.hidden, model.intermediate
        weights = (model.layers * (4 * h * h + 3 * h * i) + model.vocab * h) * model.width
        window = self.seq_len * model.vocab * 4  # one window's float32 logits; the teacher batches up to the budget
        logits = 4 * max(window, min(LOGITS_BUDGET, self.steps * self.batch_size * window))  # + log-softmax, masked
        per_position = 8 * self.teacher_top_k + 4 + 4 * h * len(self.distill_layers or [])
        targets = self.steps * self.batch_size * (self.seq_len - 1) * per_position
        return weights + logits + targets

    def memory_advice(self) -> list[str]:
        return [] if self.gradient_checkpointing else ["gradient_checkpointing: true on lora"]

    def keeps_adapter(self) -> bool:
        return not self.merge

    def check_in_recipe(self, earlier: list[Any]) -> list[str]:
        problems = []
        for spec in earlier:  # the evaluation repeated after training must not be on text it trained on
            if type(spec.config).measures_quality and isinstance(spec.config, TextSourceFields):
                overlap = held_out_overlap(self, spec.config)
                if overlap:
                    problems.append(f"{self.kind}: {overlap} is what {spec.label} measures on (held out); "
                                    "train on other text")
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


def held_out_overlap(training: TextSourceFields, evaluation: TextSourceFields) -> str | None:
    """The training text, described, when it contains text of ``evaluation``'s source (else None): the same
    corpus with a split that shares articles (``calib`` lies inside ``all``), or the same file or dataset."""
    if training.kind != evaluation.kind:
        return None
    if training.kind == "corpus":
        same = training.corpus == evaluation.corpus and (training.split == evaluation.split or "all" in
                                                          (training.split, evaluation.split))
    else:
        same = training.summary() == evaluation.summary()
    return training.describe() if same else None
