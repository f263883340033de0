"""Built-in stages. The registry imports these modules (each registers its stage); add a module here to add one.

The names are strings, imported by :func:`a3q.registry.get_stage` on first use, so that importing a stage module
never imports every other stage (and the package has no import cycles).
"""

BUILTIN_STAGE_MODULES = (
    "a3q.stages.evaluate",
    "a3q.stages.export",
    "a3q.stages.reload",
    "a3q.stages.a3.stage",
    "a3q.stages.gptq",
    "a3q.stages.bnb",
    "a3q.stages.baselines.svd",
    "a3q.stages.baselines.asvd",
    "a3q.stages.baselines.svd_llm",
    "a3q.stages.kv",
    "a3q.stages.lora.stage",
    "a3q.stages.lm_eval",
)
