"""The qkhooks benchmark harness: ``python benchmarks/run.py`` -> benchmarks/RESULTS.md + results.json.

It lives in the repository, not in the installed package (``qkhooks bench`` runs it from a checkout). What is
measured, all in one process on the same model, batch and images, methods interleaved round by round (the order
rotated each round so no method always runs first), median and interquartile range over rounds:

- ``methods`` (:mod:`harness.methods`): a plain fused forward (the physical limit), qkhooks capture only, + mode
  projection (top-16, all; per batch with no spectrum given), + attention rows (2 query tokens, every layer),
  full maps, + HDF5 streaming, and the tools people use today: timm ``AttentionExtract`` (fused attention off),
  HF eager ``output_attentions=True``, naive hooks copying every attention input to the host. Ratios are paired
  per round (time of the method / time of the plain forward in the same round), which cancels slow drifts of a
  shared machine.
- ``memory`` (:mod:`harness.memory`): peak memory per method, each in a fresh subprocess (CPU: the ``VmHWM``
  high-water mark, reset after set-up through ``/proc/self/clear_refs``; GPU: ``torch.cuda.max_memory_allocated``).
- ``projection``, ``svd`` (:mod:`harness.micro`): modes from x with a d x 2HK matrix vs from q/k with d_k x K
  matrices per head; attention rows three ways; factored SVD of W_q^T W_k (thin QR) vs the dense d x d SVD.
- ``writer``, ``codecs`` (:mod:`harness.storage`): time the forward loop spends blocked in
  ``RunWriter.write_batch``, per codec; compression ratio and write/read speed of float16 maps per HDF5 codec.
- ``dataset_memory`` (:mod:`harness.memory`): peak RSS of ``record_dataset`` at 1x and 10x the images (flat).
- ``end_to_end`` (:mod:`harness.end_to_end`): ``qkhooks record`` over a folder vs a plain DataLoader loop.
- ``profile`` (:mod:`harness.profiles`): where the time of the recording methods goes (cProfile on qkhooks
  functions, and the extra torch ops over a plain forward from torch.profiler).

:mod:`harness.render` writes the results files, :mod:`harness.driver` runs the sections, :mod:`harness.options`
holds the options. Timing assertions never belong in unit tests; tests/test_bench.py checks only the logic.
"""
