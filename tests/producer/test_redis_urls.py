"""Sentinel URL parsing (producer/redis_urls.py) and what the Celery app and the Redis client make of it."""

from __future__ import annotations

import pytest
from redis.sentinel import SentinelConnectionPool

from producer.celery_app import make_celery
from producer.connections import redis_client
from producer.redis_urls import SentinelTarget, is_sentinel_url, parse_sentinel_url
from producer.settings import Settings


def test_redis_sentinel_url_names_hosts_master_db_and_password() -> None:
    target = parse_sentinel_url("redis+sentinel://:s%40cret@s1:26379,s2:26380,s3/vqa-master/2")
    assert target == SentinelTarget(
        sentinels=(("s1", 26379), ("s2", 26380), ("s3", 26379)), master_name="vqa-master", db=2, password="s@cret"
    )


def test_redis_sentinel_url_without_master_is_refused() -> None:
    with pytest.raises(ValueError, match="names its master"):
        parse_sentinel_url("redis+sentinel://s1:26379")


def test_kombu_form_takes_the_master_from_settings_and_auth_from_the_first_part() -> None:
    url = "sentinel://user:pw@s1:26379/3;sentinel://s2:26380;sentinel://s3"
    target = parse_sentinel_url(url, master_name="m")
    assert target.sentinels == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert (target.master_name, target.db, target.username, target.password) == ("m", 3, "user", "pw")
    with pytest.raises(ValueError, match="VQA_SENTINEL_MASTER_NAME"):
        parse_sentinel_url(url)


def test_kombu_url_round_trips() -> None:
    target = parse_sentinel_url("redis+sentinel://:pw@a:1,b:2/m/1")
    assert target.kombu_url() == "sentinel://:pw@a:1/1;sentinel://:pw@b:2/1"
    assert parse_sentinel_url(target.kombu_url(), master_name="m") == target


def test_plain_redis_urls_are_not_sentinel_urls() -> None:
    assert not is_sentinel_url("redis://localhost:6379/0")
    assert is_sentinel_url("sentinel://a:1") and is_sentinel_url("redis+sentinel://a:1/m")


def test_celery_app_uses_kombu_sentinel_transport_and_backend() -> None:
    url = "redis+sentinel://a:26379,b:26380/vqa-master/0"
    app = make_celery(Settings(broker_url=url, result_backend=url))
    assert app.conf.broker_transport_options["master_name"] == "vqa-master"
    assert app.conf.result_backend_transport_options["master_name"] == "vqa-master"
    assert app.conf.broker_url == "sentinel://a:26379/0;sentinel://b:26380/0"
    assert type(app.backend).__name__ == "SentinelBackend"


def test_redis_client_resolves_through_sentinels() -> None:
    client = redis_client("sentinel://a:26379;sentinel://b:26380", master_name="vqa-master")
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "vqa-master"
    assert [conn.connection_pool.connection_kwargs["port"] for conn in pool.sentinel_manager.sentinels] == [26379, 26380]
