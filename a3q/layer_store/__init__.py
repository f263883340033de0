"""The layer store: where a model's decoder layers are, and the only code that holds, saves and restores them.

Every :class:`~a3q.graph.ModelGraph` has a store (``graph.layer_store``). The base class,
:class:`a3q.graph.LayerStore`, keeps every layer in the model (in memory); :mod:`a3q.layer_store.offloaded` keeps
them in the checkpoint's files and a folder or host memory of changed layers, one materialized at a time. Nothing
outside this package asks which one a graph has:

* :mod:`.hold`: ``hold_layer(graph, index)``, the one way to touch a layer;
* :mod:`.layer_file`: the layer file format, which pass checkpoints and the offload store share (a layer written
  once), and saving / restoring a finished layer;
* :mod:`.loading`: a model built on the meta device with its swapped-in module types, its weights read into memory
  or left in the files (``load_graph`` with ``offload``, and every a3q artifact with GPTQ or low-rank modules);
* :mod:`.offloaded`, :mod:`.folders` (the store's private folders and their removal after a kill) and
  :mod:`.streaming` (an offloaded model's export, one layer in memory at a time).

Whole-model operations ask the store, never "is it offloaded?": how export writes the weights
(``write_weights``), whether perplexity is scored layer by layer (``layer_by_layer``), which ``offload`` mode a
reload uses (``mode``).
"""
