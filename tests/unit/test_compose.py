"""docker-compose.yml against the Compose Specification's JSON schema (vendored: see
tests/data/README.md), and what the schema cannot see: references between services, the
worker's GPU, commands that parse, and GPUMARKET_* variables that the processes really read.
No Docker engine needed."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from gpumarket.cli import app
from orchestrator.config import Settings
from worker.config import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
CLIENT_ENV = {"GPUMARKET_URL", "GPUMARKET_API_KEY"}  # read by `gpumarket job`, not Settings


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def _schema_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = validator_class(schema).iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_the_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    assert _schema_errors(compose) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "worker", "depends_on", "proxy", "condition"), "service_ready"),
        (("services", "orchestrator", "portz"), ["8000:8000"]),
        (("services", "worker", "deploy", "resources", "reservations", "devices"), [{}]),
    ],
)
def test_the_schema_check_catches_mistakes(
    compose: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    broken = copy.deepcopy(compose)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert _schema_errors(broken)


def test_the_expected_services_are_there(compose: dict[str, Any]) -> None:
    assert set(_services(compose)) == {
        "anvil",
        "postgres",
        "deploy",
        "orchestrator",
        "proxy",
        "worker",
    }


def test_every_dependency_is_a_service_in_the_right_condition(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, service in services.items():
        for target, rule in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if rule["condition"] == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is not one-shot"
    orchestrator_needs = services["orchestrator"]["depends_on"]
    assert orchestrator_needs["deploy"]["condition"] == "service_completed_successfully"
    assert orchestrator_needs["postgres"]["condition"] == "service_healthy"


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in _services(compose).items():
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"


def test_the_worker_reserves_nvidia_gpus(compose: dict[str, Any]) -> None:
    worker = _services(compose)["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in devices


def test_gpumarket_variables_are_settings_the_processes_read(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        env = {k: v for k, v in _environment(service).items() if k.startswith("GPUMARKET_")}
        worker = {
            k.removeprefix("GPUMARKET_WORKER_").lower(): v
            for k, v in env.items()
            if "_WORKER_" in k
        }
        orchestrator = {
            k.removeprefix("GPUMARKET_").lower(): v
            for k, v in env.items()
            if "_WORKER_" not in k and k not in CLIENT_ENV
        }
        for field in worker:
            assert field in WorkerSettings.model_fields, f"{name}: no worker setting {field}"
        for field in orchestrator:
            assert field in Settings.model_fields, f"{name}: no orchestrator setting {field}"
        # The values are valid too (a typo'd number or URL would stop the process at start).
        if worker:
            WorkerSettings(**worker)
        if orchestrator:
            Settings(**orchestrator)


@pytest.mark.parametrize("service", ["orchestrator", "worker"])
def test_gpumarket_commands_parse(compose: dict[str, Any], service: str) -> None:
    command = _services(compose)[service]["command"]
    assert command[0] == "gpumarket"
    parsed = CliRunner().invoke(app, [*command[1:], "--help"])  # unknown options fail parsing
    assert parsed.exit_code == 0, parsed.output


def test_deploy_writes_the_file_the_orchestrator_reads(compose: dict[str, Any]) -> None:
    from contracts.deploy import _parse_args

    services = _services(compose)
    command = services["deploy"]["command"]
    assert command[:3] == ["python", "-m", "contracts.deploy"]
    args = _parse_args(command[3:])
    assert args.dev and args.rpc_url == "http://anvil:8545"
    wanted = Path(_environment(services["orchestrator"])["GPUMARKET_DEPLOYMENT_FILE"])
    assert args.out == wanted
    mounts = {svc: services[svc]["volumes"] for svc in ("deploy", "orchestrator")}
    shared = {m.split(":")[0] for m in mounts["deploy"] if m.split(":")[1] == str(wanted.parent)}
    assert shared and all(
        any(m.split(":")[:2] == [volume, str(wanted.parent)] for m in mounts["orchestrator"])
        for volume in shared
    )


def test_the_worker_finds_the_orchestrator_replicas_through_the_proxy(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    command = services["worker"]["command"]
    url = command[command.index("--orchestrator") + 1]
    proxy = services["proxy"]
    [published] = proxy["ports"]
    listen = published.split(":")[1]
    assert url == f"http://proxy:{listen}"
    # Replicas publish no port of their own (several cannot share one), and the proxy sends
    # to the orchestrator service's port, waiting longer than the longest long-poll.
    orchestrator = services["orchestrator"]
    port = _environment(orchestrator)["GPUMARKET_PORT"]
    assert "ports" not in orchestrator and str(port) in orchestrator["expose"]
    [mount] = proxy["volumes"]
    source, target = mount.split(":")[:2]
    conf = (ROOT / source).read_text()
    assert target == "/etc/nginx/conf.d/default.conf"
    assert re.search(rf"^\s*listen {listen};", conf, flags=re.MULTILINE)
    assert re.search(r"^\s*set \$replicas orchestrator;", conf, flags=re.MULTILINE)
    assert f"proxy_pass http://$replicas:{port};" in conf
    read_timeout = int(re.findall(r"proxy_read_timeout (\d+)s;", conf)[0])
    longest_poll = Settings.model_fields["long_poll_max_s"].metadata
    assert read_timeout > max(m.le for m in longest_poll if hasattr(m, "le"))


def test_anvil_is_the_version_pinned_for_development(compose: dict[str, Any]) -> None:
    pinned = json.loads((ROOT / "contracts" / "package.json").read_text())
    version = pinned["devDependencies"]["@foundry-rs/anvil"]
    image = _services(compose)["anvil"]["image"]
    assert image == f"ghcr.io/foundry-rs/foundry:v{version}"
    assert _services(compose)["anvil"]["entrypoint"][:3] == ["anvil", "--host", "0.0.0.0"]


def test_the_image_installs_every_package(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name in ("deploy", "orchestrator", "worker"):
        assert _services(compose)[name]["build"] == "."
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, flags=re.MULTILINE))
    assert set(packages) <= copied, f"not copied into the image: {set(packages) - copied}"
    assert re.search(r"^RUN pip install \.$", dockerfile, flags=re.MULTILINE)
