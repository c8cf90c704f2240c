"""The ``gpumarket`` command line (Typer + Rich)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from gpumarket.job_cli import job_app
from gpumarket.wallet import chain_fund, wallet_app

KEEP_ALIVE_S = 30

app = typer.Typer(help="gpumarket: a decentralized GPU marketplace node.", no_args_is_help=True)
orchestrator_app = typer.Typer(help="Run and manage an orchestrator.", no_args_is_help=True)
app.add_typer(orchestrator_app, name="orchestrator")
worker_app = typer.Typer(help="Run a worker on this machine.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")
chain_app = typer.Typer(help="The local development chain (anvil).", no_args_is_help=True)
app.add_typer(chain_app, name="chain")
chain_app.command("fund")(chain_fund)
app.add_typer(wallet_app, name="wallet")
app.add_typer(job_app, name="job")

DEFAULT_DEPLOYMENT = Path(".gpumarket/deployment.json")

# soft_wrap: error and log lines are never hard-wrapped at the terminal (or 80-column pipe)
# width, so a path, URL or command in them is never folded.
console = Console(stderr=True, soft_wrap=True)


def _orchestrator_settings(**overrides: Any) -> Any:
    """Settings from GPUMARKET_* env, with flags given on the command line taking precedence."""
    from orchestrator.config import Settings, describe_validation_error

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        console.print(describe_validation_error(exc), style="red", markup=False)
        raise typer.Exit(code=2) from exc


@orchestrator_app.command("serve")
def orchestrator_serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default 127.0.0.1; env GPUMARKET_HOST).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="TCP port (default 8000; env GPUMARKET_PORT).")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            help="Database URL: sqlite:///file.db or postgresql://... (default: SQLite in the "
            "state folder; env GPUMARKET_DB_URL)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="State folder (default .gpumarket; env GPUMARKET_DATA_DIR).")
    ] = None,
    blob_dir: Annotated[
        Path | None,
        typer.Option(
            help="Blob folder (default: blobs in the state folder; env GPUMARKET_BLOB_DIR)."
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help="debug|info|warning|error (default info; env GPUMARKET_LOG_LEVEL)."),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(help="text|json (JSON lines) (default text; env GPUMARKET_LOG_FORMAT)."),
    ] = None,
) -> None:
    """Serve the orchestrator's REST API (docs at /docs)."""
    settings = _orchestrator_settings(
        host=host,
        port=port,
        db_url=db,
        data_dir=data_dir,
        blob_dir=blob_dir,
        log_level=log_level,
        log_format=log_format,
    )
    import uvicorn  # after the settings check, so a bad setting is refused at once

    from gpumarket.logs import configure_logging
    from orchestrator.app import create_app
    from orchestrator.server import serve

    json_logs = settings.log_format == "json"
    configure_logging(settings.log_level, json=json_logs)
    try:
        application = create_app(settings)
        # Before serving, so a replica whose shared settings differ says so in one line.
        services = application.state.services
        if settings.auto_migrate:
            services.store.migrate()
        services.replicas.join(services.now())
    except (OSError, ValueError) as exc:  # unreadable deployment file, unreachable chain, ...
        console.print(f"cannot start: {exc}", style="red", markup=False)
        raise typer.Exit(code=2) from exc
    if settings.admin_token is None:
        console.print(
            f"operator token: {(settings.data_dir / 'admin-token').resolve()} "
            "(set GPUMARKET_ADMIN_TOKEN to choose one)"
        )
    console.print(
        f"orchestrator on http://{settings.host}:{settings.port}  "
        f"(API docs /docs, database {settings.database_url.split('://')[0]})"
    )
    serve(
        application,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # JSON: uvicorn's loggers go through ours (its own config would print plain text).
        log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG,
        # Longer than clients keep idle connections (httpx: 5 s), so a client never reuses a
        # connection the server is closing at that moment.
        timeout_keep_alive=KEEP_ALIVE_S,
    )


@orchestrator_app.command("create-client")
def orchestrator_create_client(
    name: Annotated[str, typer.Argument(help="A label for the client, e.g. a team or app.")],
    db: Annotated[
        str | None,
        typer.Option(
            help="Database URL (default: SQLite in the state folder; env GPUMARKET_DB_URL)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="State folder (default .gpumarket; env GPUMARKET_DATA_DIR).")
    ] = None,
) -> None:
    """Create a client account in the orchestrator's database and print its API key."""
    from orchestrator.services.auth import create_client
    from orchestrator.store import Store

    settings = _orchestrator_settings(db_url=db, data_dir=data_dir)
    store = Store(settings.database_url)
    try:
        store.migrate()
        client_id, key = create_client(store, name, time.time())
    finally:
        store.dispose()
    console.print(f"client {client_id} created; its API key (shown once):")
    typer.echo(key)


def _parse_prices(values: list[str]) -> dict[str, int]:
    prices: dict[str, int] = {}
    for value in values:
        key, sep, amount = value.partition("=")
        if not sep or not key or not amount.isdigit():
            console.print(
                f"--price {value!r}: use TYPE_OR_MODEL=WEI, e.g. --price inference=1000 "
                "or --price all-MiniLM-L6-v2=500",
                style="red",
                markup=False,
            )
            raise typer.Exit(code=2)
        prices[key] = int(amount)
    return prices


def _parse_prompt_prices(values: list[str]) -> dict[str, int]:
    """``--prompt-price WEI`` (every generate model) or ``MODEL=WEI`` (one model)."""
    prices: dict[str, int] = {}
    for value in values:
        key, sep, amount = value.rpartition("=")
        if not amount.isdigit() or int(amount) <= 0 or (sep and not key):
            console.print(
                f"--prompt-price {value!r}: use WEI or MODEL=WEI (a positive whole number of wei "
                "per prompt token), e.g. --prompt-price 50000000",
                style="red",
                markup=False,
            )
            raise typer.Exit(code=2)
        prices[key or "generate"] = int(amount)
    return prices


def env_prices() -> set[str]:
    """Price keys set through GPUMARKET_WORKER_PRICES_WEI (JSON), if any."""
    import json
    import os

    raw = os.environ.get("GPUMARKET_WORKER_PRICES_WEI")
    try:
        found = json.loads(raw) if raw else {}
    except ValueError:
        return set()
    return set(found) if isinstance(found, dict) else set()


def default_price_notes(settings: Any, given: set[str]) -> list[str]:
    """A line for each job type the worker offers at a default price nobody chose (no --price
    for the type): so an operator who priced only inference knows what transcoding costs."""
    from worker.config import DEFAULT_PRICES_WEI

    offered = [t.value for t in settings.job_types]
    notes = []
    for kind in offered:
        if kind in given:
            continue
        unit = {"transcode": "output pixel", "generate": "token"}.get(kind, "input item")
        others = " ".join(f"--job-type {o}" for o in offered if o != kind)
        fix = f"set it with --price {kind}=WEI" + (
            f", or leave it out with {others}" if others else ""
        )
        notes.append(
            f"{kind}: offered at the default price, {DEFAULT_PRICES_WEI[kind]} wei per {unit}; "
            + fix
        )
    return notes


@worker_app.command("run")
def worker_run(
    orchestrator: Annotated[
        list[str] | None,
        typer.Option(
            metavar="<url>",
            help="Orchestrator URL (default http://127.0.0.1:8000; env "
            "GPUMARKET_WORKER_ORCHESTRATOR_URL); repeat it, or separate with commas, for several "
            "replicas.",
        ),
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(
            help="Signing key file, made on first run if missing (default .gpumarket/worker.key)."
        ),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of TorchScript models with JSON manifests (default: none)."),
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Jobs run at once (default 4).")
    ] = None,
    price: Annotated[
        list[str] | None,
        typer.Option(
            help="Price in wei per unit: TYPE_OR_MODEL=WEI (repeatable; default "
            "inference=1000000000 per text, transcode=1000 per output pixel, "
            "generate=100000000 per token)."
        ),
    ] = None,
    prompt_price: Annotated[
        list[str] | None,
        typer.Option(
            help="Generate: price in wei per prompt token, WEI or MODEL=WEI (repeatable; default "
            "the generate price, as for a completion token)."
        ),
    ] = None,
    job_type: Annotated[
        list[str] | None,
        typer.Option(
            help="Job types to offer: inference, transcode, generate (default: inference and "
            "transcode; generate loads an LLM: the built-in SmolLM2 and GGUF files in "
            "--models-dir)."
        ),
    ] = None,
    carbon_intensity: Annotated[
        float | None, typer.Option(help="Grid carbon intensity here, gCO2/kWh (default: unknown).")
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="Scratch folder for job files (default .gpumarket/work).")
    ] = None,
    redeem_threshold: Annotated[
        int | None,
        typer.Option(
            help="Redeem a payer's voucher once it owes this many wei (default 10**16, 0.01 ETH)."
        ),
    ] = None,
    redeem_interval: Annotated[
        float | None,
        typer.Option(
            help="Redeem anything owed at least this often, seconds (default 3600; 0: threshold "
            "only)."
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus metrics on this port (default: off; 0: any free)."),
    ] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="Address the metrics port binds (default 127.0.0.1).")
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(help="text|json (JSON lines) (default text; env GPUMARKET_LOG_FORMAT)."),
    ] = None,
) -> None:
    """Register with an orchestrator and run jobs until SIGTERM (drain) or a second SIGTERM."""
    from worker.config import WorkerSettings
    from worker.config import load_or_create_key as _load_key
    from worker.main import run_worker

    overrides: dict[str, Any] = {
        "orchestrator_url": ",".join(orchestrator) if orchestrator else None,
        "key_file": key_file,
        "models_dir": models_dir,
        "max_concurrency": max_concurrency,
        "carbon_intensity_g_per_kwh": carbon_intensity,
        "work_dir": work_dir,
        "job_types": job_type,
        "redeem_threshold_wei": redeem_threshold,
        "redeem_interval_s": redeem_interval,
        "metrics_port": metrics_port,
        "metrics_host": metrics_host,
        "log_format": log_format,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if price:
        given["prices_wei"] = {**WorkerSettings().prices_wei, **_parse_prices(price)}
    if prompt_price:
        given["prompt_prices_wei"] = {
            **WorkerSettings().prompt_prices_wei,
            **_parse_prompt_prices(prompt_price),
        }
    try:
        settings = WorkerSettings(**given)
    except ValidationError as exc:
        from orchestrator.config import describe_validation_error

        message = describe_validation_error(exc, env_prefix="GPUMARKET_WORKER_")
        console.print(message, style="red", markup=False)
        raise typer.Exit(code=2) from exc
    try:
        account, created = _load_key(settings.key_file)
    except ValueError as exc:
        console.print(f"{exc}; move it away to make a new key", style="red", markup=False)
        raise typer.Exit(code=2) from exc
    if created:
        console.print(f"new worker key written to {settings.key_file.resolve()} (keep it safe)")
    console.print(f"worker {account.address} -> {settings.orchestrator_url}")
    for line in default_price_notes(settings, set(_parse_prices(price or [])) | env_prices()):
        console.print(line, markup=False)
    from gpumarket.logs import configure_logging

    configure_logging(settings.log_level, json=settings.log_format == "json")
    run_worker(settings, account)


@app.command("up")
def up(
    port: Annotated[
        int | None, typer.Option(help="Orchestrator port on 127.0.0.1 (default: any free port).")
    ] = None,
    chain_port: Annotated[
        int | None, typer.Option(help="anvil RPC port on 127.0.0.1 (default: any free port).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Keep logs and state in this new or empty folder (default: a temporary "
            "folder, removed on stop).",
            file_okay=False,
        ),
    ] = None,
    deployment: Annotated[
        Path,
        typer.Option(
            help="Where to write the contract addresses, where `gpumarket wallet` looks; "
            "removed on stop."
        ),
    ] = DEFAULT_DEPLOYMENT,
) -> None:
    """Start a whole local marketplace (anvil, contracts, orchestrator, two workers) and keep
    it running until Ctrl-C or SIGTERM; prints the dashboard, API and RPC addresses and
    commands to try it."""
    from gpumarket.demo import UpRefused
    from gpumarket.demo import console as up_console
    from gpumarket.demo import up as run_up

    try:
        code = run_up(
            port=port,
            chain_port=chain_port,
            data_dir=data_dir,
            deployment_file=deployment,
            default_deployment=DEFAULT_DEPLOYMENT,
        )
    except KeyboardInterrupt:
        up_console.print("stopped; every process was shut down")
        return
    except UpRefused as exc:
        console.print(f"gpumarket up: {exc}", style="red", markup=False)
        raise typer.Exit(2) from exc
    except RuntimeError as exc:
        console.print(f"gpumarket up failed: {exc}", style="red", markup=False)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


@chain_app.command("up")
def chain_up(
    port: Annotated[int, typer.Option(help="RPC port on 127.0.0.1.")] = 8545,
    deployment: Annotated[
        Path, typer.Option(help="Where to write the contract addresses.")
    ] = DEFAULT_DEPLOYMENT,
    state: Annotated[
        Path | None,
        typer.Option(
            help="Keep the chain in this file across restarts and crashes (anvil --state); "
            "anvil is started again from it if it dies."
        ),
    ] = None,
    state_interval: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Seconds between writes of --state: what a hard kill can lose at most "
            "(default 1).",
        ),
    ] = None,
) -> None:
    """Start anvil on loopback, deploy PaymentBroker and WorkerRegistry, write the deployment
    file the orchestrator and workers read, and run until Ctrl-C."""
    import signal

    from contracts.anvil import ensure_installed
    from gpumarket.chain_up import DEFAULT_STATE_INTERVAL_S, ChainUpFailed, run

    if state_interval is not None and state is None:
        raise typer.BadParameter("--state-interval needs --state FILE", param_hint="--state")
    ensure_installed()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(
            console,
            port=port,
            deployment_path=deployment,
            state=state,
            state_interval_s=state_interval or DEFAULT_STATE_INTERVAL_S,
        )
    except KeyboardInterrupt:
        pass
    except ChainUpFailed as exc:
        console.print(f"gpumarket chain up: {exc}", style="red", markup=False)
        raise typer.Exit(1) from exc


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    app()
