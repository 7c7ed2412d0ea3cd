"""Task messages built by hand: many Celery messages in one Redis round trip (what submit_many publishes).

``app.send_task`` costs a round trip and a few hundred microseconds of Python per message
(most of it building ``kwargsrepr``, plus a result-channel subscription). For a list of jobs
we build the very same message ourselves: Celery task protocol 2 (``headers`` + a JSON body
``[args, kwargs, embed]``) inside the envelope kombu's Redis transport stores (base64 body,
``properties`` with ``delivery_info`` and a ``delivery_tag``), and LPUSH a whole chunk onto
the queue's list with one command, as kombu's ``Channel._put`` does one message at a time.
The worker's kombu consumer reads them like any other; ``tests/producer/test_messages.py``
compares them field by field with what ``send_task`` writes.

A message of Celery priority p goes where kombu puts it: properties.priority = p, in the list
of p's priority step (producer/keys.py; our lanes "high", "default", "low" are 0, 3 and 6).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

from celery.utils.nodenames import anon_nodename
from kombu.utils.json import dumps

from producer import keys
from producer.schema import Job

# Each LPUSH carries this many messages (a few MB at most): one command, so all or none land.
CHUNK = 500
# Celery caps argsrepr/kwargsrepr (shown by monitoring tools only) at 1024 characters too.
_REPR_MAX = 1024
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "sentinel://")


class TaskMessages:
    """Encodes jobs as the exact JSON string kombu's Redis transport keeps in the queue list."""

    def __init__(self, *, queue: str, reply_to: str, key_prefix: str = "") -> None:
        self.queue = queue
        self.key_prefix = key_prefix
        self.reply_to = reply_to
        self.origin = anon_nodename()

    def key_for(self, priority: int) -> str:
        """The Redis list a message of this Celery priority is pushed to (kombu's, with the global key prefix)."""
        return self.key_prefix + keys.priority_queue_key(self.queue, priority)

    def encode(self, job: Job, *, priority: int = keys.DEFAULT_PRIORITY) -> str:
        kwargs = {"job": job.model_dump(mode="json")}
        body = dumps([[], kwargs, _EMBED])
        headers: dict[str, Any] = {
            "lang": "py",
            "task": keys.TASK_NAME,
            "id": job.job_id,
            "shadow": None,
            "eta": None,
            "expires": None if job.deadline is None else job.deadline.isoformat(),
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": job.job_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": repr(kwargs)[:_REPR_MAX],
            "origin": self.origin,
            "ignore_result": False,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        properties = {
            "correlation_id": job.job_id,
            "reply_to": self.reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": self.queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        return dumps(
            {
                "body": base64.b64encode(body.encode()).decode("ascii"),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": properties,
            }
        )
