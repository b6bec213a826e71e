"""`trainwatch serve`: the compliance console (pipeline/web) on the knowledge store, with uvicorn."""

from __future__ import annotations

import secrets
import sys

import typer

from pipeline.settings import load_settings

DEMO_DATABASE = "trainwatch_demo"  # as `trainwatch demo` writes (pipeline/commands/pipeline_cmd.py)


def serve(
    host: str = typer.Option(None, "--host", help="bind address (default: console setting, 127.0.0.1)"),
    port: int = typer.Option(None, "--port", help="port (default: console setting, 8080)"),
    store_dsn: str = typer.Option(None, "--store", help="ClickHouse DSN; default from settings (chDB)"),
    database: str = typer.Option(None, "--database", help="database name; default from settings"),
    as_of: str = typer.Option("now", "--as-of",
                              help="count days left from: now | event (the store's latest event time) | a time"),
    demo: bool = typer.Option(False, "--demo", help="the `trainwatch demo` database, days counted in event time, "
                                                    "and two one-off users (passwords printed here)"),
    hash_password: bool = typer.Option(False, "--hash-password",
                                       help="read a password from the terminal, print its argon2 hash, exit"),
) -> None:
    """Serve the compliance console: the case queue, case pages, draft reports (HTML, PDF) and a JSON API.

    Settings: [console] in the TOML file, or the environment: users from
    TRAINWATCH_CONSOLE__USERS='{"ana": {"role": "analyst", "password_hash": "$argon2id$..."}}'
    (hashes from `trainwatch serve --hash-password`); TRAINWATCH_CONSOLE__SECRET_KEY signs sessions;
    TRAINWATCH_CONSOLE__PROXY_AUTH=true trusts an SSO proxy's X-Forwarded-User / X-Forwarded-Groups headers.
    """
    import uvicorn

    from pipeline.cases.actions import feed_publisher
    from pipeline.store import Store
    from pipeline.web.app import create_app
    from pipeline.web.config import ConsoleUser
    from pipeline.web.config import hash_password as hash_pw
    from pipeline.web.views import Console

    if hash_password:
        pw = typer.prompt("password", hide_input=True, confirmation_prompt=True)
        typer.echo(hash_pw(pw))
        return
    settings = load_settings()
    console_settings = settings.console
    if demo:
        database, as_of = database or DEMO_DATABASE, as_of if as_of != "now" else "event"
        users = dict(console_settings.users)
        for role in ("analyst", "compliance"):
            if role not in users:
                pw = secrets.token_urlsafe(9)
                users[role] = ConsoleUser(role=role, password_hash=hash_pw(pw))
                typer.echo(f"demo user {role!r}, password {pw}")
        console_settings = console_settings.model_copy(update={"users": users})
    if not console_settings.users and not console_settings.proxy_auth:
        typer.secho("error: no console users configured (TRAINWATCH_CONSOLE__USERS) and proxy auth is off; "
                    "see `trainwatch serve --help`", fg="red", err=True)
        sys.exit(2)
    bind_host = host or console_settings.host
    bind_port = console_settings.port if port is None else port
    with Store.connect(store_dsn or settings.clickhouse_dsn, database or settings.database) as store:
        app = create_app(Console(store, settings.policy, feed=feed_publisher(settings, store)), console_settings,
                         as_of=as_of)
        typer.echo(f"console on http://{bind_host}:{bind_port}/ (database {store.database})")
        # One worker process: chDB allows one engine per path, and the Store is shared by the request threads.
        uvicorn.run(app, host=bind_host, port=bind_port, log_level="info", proxy_headers=False)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
