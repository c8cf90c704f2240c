"""Orchestrator settings: GPUMARKET_* env, CLI flags over env, refusal of bad config at start."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from gpumarket.cli import _orchestrator_settings, app
from orchestrator.config import DEFAULT_DATA_DIR, Settings, describe_validation_error
from orchestrator.services.auth import Authenticator
from orchestrator.store import Store
from orchestrator.store.models import Client

PROD_TOKEN = "k3y-" + "x7Qp9" * 8  # 44 characters, not a placeholder
SUBPROCESS_TIMEOUT_S = 60


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No GPUMARKET_* from the caller's shell, and relative paths land in tmp_path."""
    for name in list(os.environ):
        if name.upper().startswith("GPUMARKET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# -- from the environment ------------------------------------------------------------------------


def test_defaults_keep_state_in_a_local_folder(tmp_path: Path) -> None:
    settings = Settings()
    assert settings.env == "dev"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.data_dir == DEFAULT_DATA_DIR
    db_file = (tmp_path / DEFAULT_DATA_DIR / "orchestrator.db").resolve()
    assert settings.database_url == f"sqlite:///{db_file}"
    assert settings.blob_path == DEFAULT_DATA_DIR / "blobs"
    assert settings.heartbeat_interval_s < settings.lease_ttl_s


def test_settings_come_from_gpumarket_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "GPUMARKET_ENV": "prod",
        "GPUMARKET_HOST": "0.0.0.0",
        "GPUMARKET_PORT": "9001",
        "GPUMARKET_DATA_DIR": str(tmp_path / "state"),
        "GPUMARKET_DB_URL": "postgresql://gm@db:5432/gm",
        "GPUMARKET_BLOB_DIR": str(tmp_path / "blobs"),
        "GPUMARKET_ADMIN_TOKEN": PROD_TOKEN,
        "GPUMARKET_MAX_BLOB_BYTES": "1048576",
        "GPUMARKET_LEASE_TTL_S": "45.5",
        "GPUMARKET_HEARTBEAT_INTERVAL_S": "15",
        "GPUMARKET_LONG_POLL_MAX_S": "20",
        "GPUMARKET_SWEEP_INTERVAL_S": "0.5",
        "GPUMARKET_CHALLENGE_TTL_S": "120",
        "GPUMARKET_DISPATCH_BATCH": "64",
        "GPUMARKET_AUTO_MIGRATE": "false",
        "GPUMARKET_LOG_LEVEL": "debug",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.env == "prod"
    assert (settings.host, settings.port) == ("0.0.0.0", 9001)
    assert settings.data_dir == tmp_path / "state"
    assert settings.database_url == "postgresql://gm@db:5432/gm"
    assert settings.blob_path == tmp_path / "blobs"
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == PROD_TOKEN
    assert PROD_TOKEN not in repr(settings)
    assert settings.max_blob_bytes == 1_048_576
    assert (settings.lease_ttl_s, settings.heartbeat_interval_s) == (45.5, 15.0)
    assert (settings.long_poll_max_s, settings.sweep_interval_s) == (20.0, 0.5)
    assert (settings.challenge_ttl_s, settings.dispatch_batch) == (120.0, 64)
    assert settings.auto_migrate is False
    assert settings.log_level == "debug"


def test_settings_ignore_unrelated_gpumarket_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's GPUMARKET_WORKER_* settings share the shell with the orchestrator's.
    monkeypatch.setenv("GPUMARKET_WORKER_ORCHESTRATOR", "http://localhost:8000")
    assert Settings().port == 8000


@pytest.mark.parametrize(
    "url",
    ["sqlite:///x.db", "postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg://h/d"],
)
def test_supported_database_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("GPUMARKET_DB_URL", url)
    assert Settings().database_url == url


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GPUMARKET_PORT": "70000"}, "GPUMARKET_PORT"),
        ({"GPUMARKET_LEASE_TTL_S": "0"}, "GPUMARKET_LEASE_TTL_S"),
        ({"GPUMARKET_MAX_BLOB_BYTES": "0"}, "GPUMARKET_MAX_BLOB_BYTES"),
        ({"GPUMARKET_DISPATCH_BATCH": "0"}, "GPUMARKET_DISPATCH_BATCH"),
        ({"GPUMARKET_LOG_LEVEL": "loud"}, "GPUMARKET_LOG_LEVEL"),
        ({"GPUMARKET_ENV": "staging"}, "GPUMARKET_ENV"),
        ({"GPUMARKET_DB_URL": "mysql://u@h/db"}, "GPUMARKET_DB_URL"),
        ({"GPUMARKET_REDEMPTION_CONFIRMATIONS": "-1"}, "GPUMARKET_REDEMPTION_CONFIRMATIONS"),
        (
            {"GPUMARKET_HEARTBEAT_INTERVAL_S": "30", "GPUMARKET_LEASE_TTL_S": "30"},
            "GPUMARKET_HEARTBEAT_INTERVAL_S",
        ),
        ({"GPUMARKET_ENV": "prod"}, "GPUMARKET_ADMIN_TOKEN"),
        ({"GPUMARKET_ENV": "prod", "GPUMARKET_ADMIN_TOKEN": "changeme"}, "GPUMARKET_ADMIN_TOKEN"),
        ({"GPUMARKET_ENV": "prod", "GPUMARKET_ADMIN_TOKEN": "short-1234"}, "GPUMARKET_ADMIN_TOKEN"),
    ],
)
def test_invalid_settings_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as excinfo:
        Settings()
    assert re.search(rf"\b{named}\b", describe_validation_error(excinfo.value))


def test_prod_accepts_a_long_random_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUMARKET_ENV", "prod")
    monkeypatch.setenv("GPUMARKET_ADMIN_TOKEN", PROD_TOKEN)
    assert Settings().resolve_admin_token() == PROD_TOKEN
    assert not DEFAULT_DATA_DIR.exists()  # a given token is never written to disk


# -- CLI flags over env --------------------------------------------------------------------------


def test_cli_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPUMARKET_HOST", "0.0.0.0")
    monkeypatch.setenv("GPUMARKET_PORT", "9001")
    monkeypatch.setenv("GPUMARKET_DB_URL", "sqlite:///from-env.db")
    monkeypatch.setenv("GPUMARKET_LOG_LEVEL", "warning")
    settings = _orchestrator_settings(
        host=None,  # a flag left out keeps the env value
        port=9100,
        db_url="sqlite:///from-flag.db",
        data_dir=tmp_path / "flagged",
        blob_dir=None,
        log_level=None,
    )
    assert settings.host == "0.0.0.0"
    assert settings.port == 9100
    assert settings.database_url == "sqlite:///from-flag.db"
    assert settings.data_dir == tmp_path / "flagged"
    assert settings.log_level == "warning"


def test_cli_invalid_flag_exits_2_naming_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as excinfo:
        _orchestrator_settings(port=70000)
    assert excinfo.value.exit_code == 2
    assert "GPUMARKET_PORT" in capsys.readouterr().err


def test_serve_flag_is_validated_like_its_variable(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["orchestrator", "serve", "--db", "mysql://x"])
    assert result.exit_code == 2
    assert "GPUMARKET_DB_URL" in result.stderr
    assert not DEFAULT_DATA_DIR.exists()


def test_create_client_prints_a_key_that_authenticates(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_db = tmp_path / "env.db"
    flag_db = tmp_path / "flag.db"
    monkeypatch.setenv("GPUMARKET_DB_URL", f"sqlite:///{env_db}")
    result = CliRunner().invoke(
        app, ["orchestrator", "create-client", "acme", "--db", f"sqlite:///{flag_db}"]
    )
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("gmk_")
    assert "shown once" in result.stderr
    assert not env_db.exists(), "--db must override GPUMARKET_DB_URL"

    store = Store(f"sqlite:///{flag_db}")
    try:
        principal = Authenticator(store, "operator-token-unused-here").client(key)
        assert principal.kind == "client"
        with store.read() as s:
            client = s.get(Client, principal.id)
            assert client is not None and client.name == "acme"
    finally:
        store.dispose()


# -- the operator token --------------------------------------------------------------------------


def test_dev_admin_token_is_made_once_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    first = Settings(data_dir=data_dir).resolve_admin_token()
    token_file = data_dir / "admin-token"
    assert first.startswith("gmo_") and len(first) >= 40
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == first
    # A second process (a new Settings) finds the same token and leaves the file alone.
    before = token_file.stat()
    assert Settings(data_dir=data_dir).resolve_admin_token() == first
    assert token_file.stat().st_mtime_ns == before.st_mtime_ns
    assert [p.name for p in data_dir.iterdir()] == ["admin-token"]  # no temp files left


def test_replicas_making_the_dev_token_at_once_all_get_the_first_ones(tmp_path: Path) -> None:
    """Several replicas on one data folder (a shared volume) start together: one token."""
    import threading

    data_dir = tmp_path / "state"
    start = threading.Barrier(8)
    tokens: list[str] = []

    def resolve() -> None:
        start.wait(timeout=10)
        tokens.append(Settings(data_dir=data_dir).resolve_admin_token())

    threads = [threading.Thread(target=resolve) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert (data_dir / "admin-token").read_text().strip() == tokens[0]
    assert [p.name for p in data_dir.iterdir()] == ["admin-token"]


def test_an_empty_token_file_is_replaced(tmp_path: Path) -> None:
    # e.g. left behind by a crash or a full disk; "" must never become the operator token.
    data_dir = tmp_path / "state"
    data_dir.mkdir()
    (data_dir / "admin-token").write_text("\n")
    token = Settings(data_dir=data_dir).resolve_admin_token()
    assert token.startswith("gmo_")
    assert (data_dir / "admin-token").read_text().strip() == token
    assert stat.S_IMODE((data_dir / "admin-token").stat().st_mode) == 0o600


def test_a_given_admin_token_wins_over_the_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    Settings(data_dir=data_dir).resolve_admin_token()
    given = Settings(data_dir=data_dir, admin_token=PROD_TOKEN)
    assert given.resolve_admin_token() == PROD_TOKEN


# -- `gpumarket orchestrator serve` refuses bad config at start ----------------------------------

# case: (environment, the variable the refusal must name)
SERVE_REFUSALS: dict[str, tuple[dict[str, str], str]] = {
    "lease-ttl-negative": ({"GPUMARKET_LEASE_TTL_S": "-1"}, "GPUMARKET_LEASE_TTL_S"),
    "port-not-a-number": ({"GPUMARKET_PORT": "notaport"}, "GPUMARKET_PORT"),
    "heartbeat-not-shorter-than-ttl": (
        {"GPUMARKET_HEARTBEAT_INTERVAL_S": "30", "GPUMARKET_LEASE_TTL_S": "20"},
        "GPUMARKET_HEARTBEAT_INTERVAL_S",
    ),
    "mysql-url": ({"GPUMARKET_DB_URL": "mysql://x"}, "GPUMARKET_DB_URL"),
    "prod-without-token": ({"GPUMARKET_ENV": "prod"}, "GPUMARKET_ADMIN_TOKEN"),
    "prod-placeholder-token": (
        {"GPUMARKET_ENV": "prod", "GPUMARKET_ADMIN_TOKEN": "changeme"},
        "GPUMARKET_ADMIN_TOKEN",
    ),
}


def _gpumarket_command() -> list[str]:
    script = Path(sys.executable).parent / "gpumarket"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gpumarket.cli"]


@pytest.fixture(scope="module")
def serve_refusals(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[subprocess.CompletedProcess[str], Path]]]:
    """Start every bad configuration at once (each is a separate process) and collect them."""
    base_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GPUMARKET_")}
    running = {}
    for case, (env, _) in SERVE_REFUSALS.items():
        workdir = tmp_path_factory.mktemp(case)
        data_dir = workdir / "data"
        # Port 0 where the case allows it: should a bad config be let through, the server
        # that starts must not collide with anything before it is killed.
        port = [] if "GPUMARKET_PORT" in env else ["--port", "0"]
        command = [*_gpumarket_command(), "orchestrator", "serve", *port]
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            env={**base_env, "GPUMARKET_DATA_DIR": str(data_dir), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running[case] = (proc, data_dir)
    results = {}
    try:
        for case, (proc, data_dir) in running.items():
            out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            results[case] = (
                subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                data_dir,
            )
    finally:
        for proc, _ in running.values():
            if proc.poll() is None:  # it started serving instead of refusing
                proc.kill()
                proc.wait()
    yield results


@pytest.mark.parametrize("case", list(SERVE_REFUSALS))
def test_serve_refuses_bad_config_naming_the_setting(
    serve_refusals: dict[str, tuple[subprocess.CompletedProcess[str], Path]], case: str
) -> None:
    done, data_dir = serve_refusals[case]
    named = SERVE_REFUSALS[case][1]
    assert done.returncode == 2, f"exit {done.returncode}\nstdout:\n{done.stdout}\n{done.stderr}"
    assert re.search(rf"\b{named}\b", done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert not data_dir.exists(), "refused before creating any state"


def test_serve_refuses_a_bad_deployment_file_with_a_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "deployment.json"
    bad.write_text("{}")
    for path, expected in (
        (bad, "is not a deployment file"),
        (tmp_path / "missing.json", "No such file"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "gpumarket.cli", "orchestrator", "serve"],
            env={
                **os.environ,
                "GPUMARKET_DATA_DIR": str(tmp_path / "data"),
                "GPUMARKET_DEPLOYMENT_FILE": str(path),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert expected in done.stderr.replace("\n", " ")
        assert "Traceback" not in done.stderr
