"""`python -m tokenmill.services.<name>` entry helper: config -> logging -> build -> serve.

A config that cannot start the service exits with status 2 and one message naming the field
(never a traceback): operators fix configs from the message alone. A service that cannot bind
its port exits with status 1 and says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from pydantic_settings import SettingsError

from tokenmill.common.config import Config, ConfigError, load_config
from tokenmill.common.errors import TokenmillError
from tokenmill.common.runtime.app import ReadyCheck, ServiceApp, StartupError
from tokenmill.common.runtime.logs import setup_logging

log = logging.getLogger("tokenmill.runtime")

Build = Callable[[Config, ServiceApp], ReadyCheck | None]

EXIT_CONFIG = 2
EXIT_STARTUP = 1


def _config_message(exc: Exception) -> str:
    """One readable message for every way config loading fails."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, SettingsError):
        # pydantic-settings: 'error parsing value for field "auth" from source "EnvSettingsSource"'
        return (
            f"invalid configuration: {exc} (complex fields in TOKENMILL_* variables must be JSON, "
            "e.g. TOKENMILL_AUTH__TOKENS='[\"a-long-token-value\"]')"
        )
    if isinstance(exc, yaml.YAMLError):
        return f"invalid configuration: the YAML file does not parse: {exc}"
    return f"invalid configuration: {exc}"


def load_or_exit(path: str | None, prog: str) -> Config:
    """`load_config(path)`, or print the reason to stderr and exit 2."""
    try:
        return load_config(path)
    except (ConfigError, SettingsError, yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        print(f"{prog}: {_config_message(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every service accepts (`--config PATH`); richer ones add to it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="PATH", help="YAML config file (default: $TOKENMILL_CONFIG)")
    return parser


def run_service(
    name: str,
    build: Build,
    argv: Sequence[str] | None = None,
    *,
    server_options: Sequence[tuple[str, Any]] = (),
) -> int:
    """Parse `--config`, load it, then `serve_service` (the whole `main` of most services).

    `server_options`: extra gRPC server options for this service (see `ServiceApp`).

    Returns the process exit status (0 after a clean drain)."""
    prog = f"tokenmill-{name}"
    args = config_parser(prog, f"Run the tokenmill {name} service.").parse_args(argv)
    config = load_or_exit(args.config, prog)
    return serve_service(name, build, config, prog=prog, server_options=server_options)


def serve_service(
    name: str,
    build: Build,
    config: Config,
    *,
    prog: str,
    port: int | None = None,
    metrics_port: int | None = None,
    min_workers: int = 0,
    server_options: Sequence[tuple[str, Any]] = (),
) -> int:
    """Set up logging, `ready = build(config, app)`, `app.serve(ready)`; returns the exit status.

    For services whose command line is richer than `--config` (the inference router and
    replica): they parse it themselves, then start the same way every service does. `port`,
    `metrics_port`, `min_workers` and `server_options` go to `ServiceApp`."""
    setup_logging(config.log_level, config.log_format, service=name)
    try:
        app = ServiceApp(
            name,
            config,
            port=port,
            metrics_port=metrics_port,
            min_workers=min_workers,
            server_options=server_options,
        )
        ready = build(config, app)
        app.serve(ready)
        stuck = app.stuck_handlers(timeout=1.0)
        if stuck:
            # Handlers that ignore cancellation would keep the process alive (the interpreter
            # joins pool threads at exit); the drain is over, so leave without them.
            log.warning("%s: %d handler(s) still running after the drain; exiting anyway", name, len(stuck))
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except StartupError as exc:
        log.error("%s", exc)
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except TokenmillError as exc:  # e.g. the storage backend is unusable
        log.error("%s cannot start: %s", name, exc.message)
        print(f"{prog}: cannot start: {exc.message}", file=sys.stderr)
        return EXIT_STARTUP
    return 0
