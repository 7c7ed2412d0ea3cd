"""The Celery application both sides share: JSON only, late acks, Redis visibility timeout from settings."""

from __future__ import annotations

from celery import Celery

from producer.keys import TASK_NAME
from producer.settings import Settings


def make_celery(settings: Settings) -> Celery:
    """Build a Celery app for these settings. No connection is opened until first use."""
    app = Celery("vqa", broker=settings.broker_url, backend=settings.result_backend, set_as_current=False)
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # Give up on a dead broker instead of hanging a producer forever.
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
    }
    app.conf.update(
        # JSON everywhere: a pickled message is never accepted (it would run code on the worker).
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        task_acks_late=True,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        redis_socket_connect_timeout=5,
        redis_socket_timeout=30,
        result_extended=True,
    )
    if settings.signs_messages:
        _sign_messages(app, settings)
    return app


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
