"""Checkpoints and clean stops for long runs (``OUT/checkpoint``; ``a3q run --resume`` / ``--restart``).

* :mod:`a3q.checkpoint.store`: the folder, its sealed manifest, atomic tensor files, recipe and model identity, what
  in the folder is a3q's (nothing else is followed or deleted);
* :mod:`a3q.checkpoint.consistency`: every field of a manifest against the recipe and the model, before a resume works;
* :mod:`a3q.checkpoint.run`: whether a run may use the folder (resume, restart), checkpoints after each stage group;
* :mod:`a3q.checkpoint.layer_pass`: checkpoints inside a pipeline pass (after planning, every few layers) and
  restoring one;
  (a finished layer is a layer file, :mod:`a3q.layer_store.layer_file`: tensors plus constructor arguments, no
  pickle; an offload store's file is linked, not written again);
* :mod:`a3q.checkpoint.state`: stage states and RNG states as JSON plus tensors;
* :mod:`a3q.checkpoint.stops`: SIGINT/SIGTERM end a run at the next safe point.
"""
