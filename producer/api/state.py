"""What the API's handlers share: settings, one VQAClient, the Idempotency-Key store, ingest rules, bulk runs it publishes."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from producer.api.idempotency import IdempotencyKeys
from producer.client import VQAClient
from producer.connections import redis_client
from producer.ingest.rules import IngestRule, load_rules
from producer.settings import Settings

if TYPE_CHECKING:
    from producer.bulk.run import BulkRun

log = logging.getLogger(__name__)


@dataclass
class Publishing:
    """A bulk run this process publishes, and the manifest file it wrote from a request body (removed once published)."""

    run: BulkRun
    manifest: Path | None


@dataclass
class ApiState:
    settings: Settings
    client: VQAClient
    idempotency: IdempotencyKeys
    rules: list[IngestRule]
    publishing: dict[str, Publishing] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, settings: Settings) -> ApiState:
        rules = load_rules(settings)  # InvalidJob: the API does not start with broken rules
        client = VQAClient(settings)
        idempotency = IdempotencyKeys(redis_client(settings.broker_url, master_name=settings.sentinel_master_name), ttl_s=settings.api_idempotency_ttl_s)
        return cls(settings=settings, client=client, idempotency=idempotency, rules=rules)

    def keep_publishing(self, entry: Publishing) -> None:
        """Hold a publishing run's handle (so its thread goes on); let go of runs that finished publishing."""
        with self.lock:
            self.reap()
            self.publishing[entry.run.bulk_id] = entry

    def reap(self) -> None:
        for bulk_id, entry in list(self.publishing.items()):
            if not entry.run.publishing:
                self._let_go(bulk_id)

    def _let_go(self, bulk_id: str) -> None:
        entry = self.publishing.pop(bulk_id)
        try:
            entry.run.close()
        except Exception:  # noqa: BLE001 - a run that stopped with an error keeps it in its status
            log.warning("bulk run %s stopped publishing with an error", bulk_id, exc_info=True)
        if entry.manifest is not None:
            entry.manifest.unlink(missing_ok=True)

    def close(self) -> None:
        with self.lock:
            for bulk_id in list(self.publishing):
                self._let_go(bulk_id)
        self.idempotency.client.close()
        self.client.close()
