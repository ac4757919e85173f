"""What every service process does around its loop: logging, the entry-point wrapper (a
configuration error is one line on stderr and exit 2), the Redis connection with retry, and
the address peers reach it at. The gateway uses these too; :mod:`epd.service` re-exports them.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Callable

from epd.config import CommonConfig, ConfigError
from epd.registry.registry import Registry, RegistryError, redact_url

logger = logging.getLogger(__name__)


def setup_logging(level: str, name: str) -> None:
    """Log to stderr at ``level`` (``EPD_LOG_LEVEL``), each line naming the process (``name``)."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_main(main: Callable[[], int | None]) -> None:
    """Run a service entry point: configuration errors become one line on stderr and exit 2;
    otherwise exit with ``main``'s return value (0 when None)."""
    try:
        code = main()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RegistryError as exc:
        print(f"configuration error: EPD_REDIS_URL: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def connect_registry(url: str, retry_s: float, secret: bytes | None = None) -> Registry:
    """A :class:`Registry` whose Redis answered a ping, retrying for up to ``retry_s`` seconds.

    Raises:
        ConfigError: still unreachable after ``retry_s`` (names EPD_REDIS_URL and EPD_REDIS_RETRY_S).
    """
    registry = Registry(url, secret=secret)
    deadline = time.monotonic() + retry_s
    while True:
        try:
            registry.ping()
            return registry
        except RegistryError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"EPD_REDIS_URL: {exc} (gave up after {retry_s:g} s, EPD_REDIS_RETRY_S)"
                ) from None
            logger.warning("Redis at %s not reachable yet; retrying", redact_url(url))
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())) or 0.05)


def advertised_host(config: CommonConfig) -> str:
    """The address peers use: EPD_ADVERTISE_HOST, else EPD_HOST, else (EPD_HOST a wildcard such
    as 0.0.0.0 in a container) this host's address from its hostname."""
    if config.advertise_host:
        return config.advertise_host
    if config.host not in ("0.0.0.0", "::", "*", ""):
        return config.host
    return socket.gethostbyname(socket.gethostname())
