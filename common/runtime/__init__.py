"""The gRPC service runtime every tokenmill service is built on (see docs/contracts.md)."""

from tokenmill.common.runtime.app import ReadyCheck, ServiceApp, StartupError
from tokenmill.common.runtime.entry import (
    EXIT_CONFIG,
    EXIT_STARTUP,
    config_parser,
    load_or_exit,
    run_service,
    serve_service,
)
from tokenmill.common.runtime.logs import current_request_id, setup_logging

__all__ = [
    "EXIT_CONFIG",
    "EXIT_STARTUP",
    "ReadyCheck",
    "ServiceApp",
    "StartupError",
    "config_parser",
    "current_request_id",
    "load_or_exit",
    "run_service",
    "serve_service",
    "setup_logging",
]
