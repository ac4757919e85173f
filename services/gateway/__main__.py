"""``python -m services.gateway`` — run the OpenAI-compatible gateway (config from ``EPD_*``)."""

import logging

from aiohttp import web

from epd import config
from epd.bootstrap import run_main, setup_logging


def main() -> None:
    cfg = config.load(config.GatewayConfig)
    setup_logging(cfg.log_level, "gateway")
    from services.gateway.http import make_app  # after config: heavy imports

    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # handler_cancellation: a client that disconnects cancels its handler, whose cleanup aborts
    # the request in every stage (services.gateway.responder.respond, Generation.close).
    web.run_app(make_app(cfg), host=cfg.gateway_host, port=cfg.gateway_port, print=None,
                handler_cancellation=True)


if __name__ == "__main__":
    run_main(main)
