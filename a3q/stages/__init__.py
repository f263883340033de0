"""Built-in stages. Importing this package registers them; add a module here to add a stage."""

from a3q.stages import evaluate, export, reload  # noqa: F401
from a3q.stages.a3 import layerwise as _a3_layerwise  # noqa: F401
from a3q.stages.a3 import stage as _a3_stage  # noqa: F401
from a3q.stages import gptq as _gptq  # noqa: F401
from a3q.stages import bnb as _bnb  # noqa: F401
from a3q.stages import baselines as _baselines  # noqa: F401
from a3q.stages import kv as _kv  # noqa: F401
from a3q.stages.lora import stage as _lora_stage  # noqa: F401
