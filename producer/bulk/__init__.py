"""Bulk runs: a manifest of images answered as one run, with progress, resume, cancel and one results file.

Who does what (modules in this package unless named)::

    submitter (vqa bulk submit, VQAClient.bulk)      worker (worker/bulkruns.py, a lifecycle hook)
      manifest.py  rows from JSONL/CSV/Parquet/S3      on_started: jobs of a run -> running
      lines.py     rows -> jobs, invalid lines         on_stored (before the ack): count the
      submit.py    chunks -> publish.lua, while          outcome + append to the log, once per
                   in flight + chunk <= window           job (stored.lua); seal the log every
                                                         VQA_BULK_SEGMENT_JOBS entries and
    readers (vqa bulk status/results/cancel, BulkRun)    write the segment to S3; end the run
      status.py    counts that always add up             after its last job
      completions.py / results.py   the results file
      run.py       the handle: status, results, cancel, wait

Redis holds the window, never the run: per run a meta hash (options, state, cursor, counters,
usage), the set of jobs in flight (at most the window), the running subset, the log tail (less
than a segment) and sealed segments on their way to S3. S3 holds what lasts, under
``{prefix}bulk/{bulk_id}/``: status.json, invalid.jsonl and log/ segments. Key names are in
producer/keys.py, the scripts in lua/.
"""

from producer.bulk.run import BulkRun, attach, start
from producer.bulk.status import BulkCounts, BulkStatus, BulkUsage
from producer.bulk.submit import BulkOptions, InvalidManifest

__all__ = ["BulkCounts", "BulkOptions", "BulkRun", "BulkStatus", "BulkUsage", "InvalidManifest", "attach", "start"]
