"""The gateway's aiohttp application: the OpenAI endpoints (:mod:`services.gateway.handlers`)
over the core (:class:`services.gateway.core.GatewayCore`), API-key auth, and the mapping of
every error to an OpenAI-style JSON body with its HTTP status.

This is the HTTP layer: it imports the core, never the reverse (DESIGN.md §7).
"""

from __future__ import annotations

import hmac
import logging

from aiohttp import web

from epd.config import GatewayConfig
from services.gateway.core import GatewayCore
from services.gateway.handlers import OpenAIServing
from services.gateway.protocol import ApiError

logger = logging.getLogger(__name__)

SERVING_KEY = web.AppKey("serving", OpenAIServing)


def error_response(error: ApiError) -> web.Response:
    """``error`` as an OpenAI-style JSON body (``{"error": {...}}``) with its status and headers."""
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """``EPD_API_KEY`` set: every ``/v1/`` route needs ``Authorization: Bearer <key>``."""
    core = request.app[SERVING_KEY].core
    key = core.cfg.api_key
    if key and request.path.startswith("/v1/"):
        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            core.metrics.errors.labels("401").inc()
            return error_response(ApiError(401, "Incorrect API key provided." if got else "Missing API key: send "
                                           "'Authorization: Bearer <key>'.", code="invalid_api_key"))
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error as an OpenAI-style body: :class:`ApiError` as raised, 413 for a body over
    ``EPD_MAX_BODY_MB``, aiohttp's HTTP errors with their status, anything else 500 (logged)."""
    core = request.app[SERVING_KEY].core
    try:
        return await handler(request)
    except ApiError as exc:
        error = exc
    except web.HTTPRequestEntityTooLarge as exc:
        error = ApiError(413, f"request body too large (EPD_MAX_BODY_MB): {exc.text}")
    except web.HTTPException as exc:
        error = ApiError(exc.status, exc.reason, type_="invalid_request_error")
    except Exception:
        logger.exception("unhandled error on %s", request.path)
        error = ApiError(500, "internal server error", type_="internal_error")
    core.metrics.errors.labels(str(error.status)).inc()
    return error_response(error)


def make_app(cfg: GatewayConfig) -> web.Application:
    """The aiohttp application of one gateway: its core starts with the app and stops with it.

    Raises:
        ConfigError: a non-loopback ``EPD_HOST`` without ``EPD_CLUSTER_SECRET`` (from the core).
    """
    app = web.Application(client_max_size=cfg.max_body_mb << 20, middlewares=[error_middleware, auth_middleware])
    core = GatewayCore(cfg)
    serving = OpenAIServing(core)
    app[SERVING_KEY] = serving

    async def on_startup(_app):
        await core.start()

    async def on_cleanup(_app):
        await core.stop()
        await serving.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    serving.add_routes(app)
    return app
