"""The Celery application both sides share: JSON only, late acks, Redis visibility timeout from settings.

``make_celery(settings)`` is what our own code calls, with the settings it was given. For
Celery's own tools the module also provides ``app`` (``celery -A producer.celery_app inspect
ping``, ``celery -A producer.celery_app flower``): built from the ``VQA_*`` environment the
first time it is read, not at import (a module ``__getattr__``), and the same object after that.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from celery import Celery

from producer.keys import DEFAULT_PRIORITY, TASK_NAME
from producer.redis_urls import is_sentinel_url, parse_sentinel_url
from producer.settings import Settings


def make_celery(settings: Settings) -> Celery:
    """Build a Celery app for these settings. No connection is opened until first use."""
    broker = _celery_url(settings.broker_url, settings)
    backend = _celery_url(settings.result_backend, settings)
    app = Celery("vqa", broker=broker.url, backend=backend.url, set_as_current=False)
    transport: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout,
        # Give up on a dead broker instead of hanging a producer forever.
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
    }
    transport.update(broker.transport_options)
    app.conf.update(
        # JSON everywhere: a pickled message is never accepted (it would run code on the worker).
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=settings.queue,
        # Celery's own send_task of our task without a priority lands in the "default" lane
        # (producer/keys.py PRIORITIES): a route's priority applies where the caller gives none.
        task_routes={TASK_NAME: {"queue": settings.queue, "priority": DEFAULT_PRIORITY}},
        task_acks_late=True,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}, **backend.transport_options},
        redis_socket_connect_timeout=5,
        redis_socket_timeout=30,
        result_extended=True,
    )
    if settings.signs_messages:
        _sign_messages(app, settings)
    return app


class _CeleryURL(NamedTuple):
    url: str
    transport_options: dict[str, Any]


def _celery_url(url: str, settings: Settings) -> _CeleryURL:
    """A Sentinel URL as kombu's transport and Celery's ``sentinel://`` backend read it; other URLs as they are."""
    if not is_sentinel_url(url):
        return _CeleryURL(url, {})
    target = parse_sentinel_url(url, master_name=settings.sentinel_master_name)
    sentinel_timeouts = {"socket_connect_timeout": 5, "socket_timeout": 5}
    return _CeleryURL(target.kombu_url(), {"master_name": target.master_name, "sentinel_kwargs": sentinel_timeouts})


def _sign_messages(app: Celery, settings: Settings) -> None:
    """Sign every task message (Celery's ``auth`` serializer); results stay plain JSON.

    ``setup_security`` registers the serializer in kombu's process-wide registry: one signing
    identity per process. Workers verify with ``worker.messages.SignatureVerifier``.
    """
    assert settings.security_key is not None and settings.security_certificate is not None
    app.conf.update(task_serializer="auth", accept_content=["auth"], security_digest=settings.security_digest)
    password = settings.security_key_password
    app.setup_security(
        allowed_serializers=["json"],
        key=settings.security_key,
        key_password=password.get_secret_value() if password is not None else None,
        cert=settings.security_certificate,
        # Celery wants a store even to sign; the signer's own certificate will do.
        store=settings.security_cert_store or settings.security_certificate,
        digest=settings.security_digest,
        serializer="json",
    )


_app: Celery | None = None
_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``app``: the Celery app of the ``VQA_*`` settings, built at first use (Celery's ``find_app`` reads ``module.app``)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global _app
    with _app_lock:
        if _app is None:
            _app = make_celery(Settings())
        return _app
