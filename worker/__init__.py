"""The worker side (install with the ``worker`` extra): model, image fetching, micro-batching, storage.

Importing this package loads nothing; the model is loaded by :func:`worker.main.run_worker`.
"""
