"""The light base package: the job/record contract, settings, errors, the Celery app and the client.

Installs without torch. The GPU side lives in :mod:`worker` (the ``worker`` extra).
"""
