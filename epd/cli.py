"""The ``epd`` command: ``epd up``, ``epd serve ROLE``, ``epd model build``."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from epd import config

ROLES = ("encoder", "prefill", "decode", "gateway")


def _cmd_up(args: argparse.Namespace) -> int:
    from epd.launcher import up

    overrides = {
        "encoders": args.encoders, "prefills": args.prefills, "decodes": args.decodes,
        "gateway_port": args.port, "gateway_host": args.host, "model": args.model,
        "redis_url": args.redis_url, "transfer_backend": args.transfer_backend,
    }
    cfg = config.load(config.LauncherConfig, **overrides)
    return up(cfg)


def _cmd_serve(args: argparse.Namespace) -> int:
    sys.argv = [f"services.{args.role}"]
    runpy.run_module(f"services.{args.role}", run_name="__main__")
    return 0


def _cmd_model_build(args: argparse.Namespace) -> int:
    from epd.models.build import build_model

    out = build_model(args.preset, Path(args.out), seed=args.seed)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="epd", description="epd-serve: E/P/D disaggregated VLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    p_up = sub.add_parser("up", help="start Redis (embedded if needed), the model and every service")
    p_up.add_argument("--encoders", type=int, help="encoder instances (EPD_ENCODERS, default 1)")
    p_up.add_argument("--prefills", type=int, help="prefill instances (EPD_PREFILLS, default 1)")
    p_up.add_argument("--decodes", type=int, help="decode instances (EPD_DECODES, default 1)")
    p_up.add_argument("--port", type=int, help="gateway port (EPD_GATEWAY_PORT, default 8000)")
    p_up.add_argument("--host", help="gateway bind address (EPD_GATEWAY_HOST, default 127.0.0.1)")
    p_up.add_argument("--model", help="model directory (EPD_MODEL; default: tiny preset, built if missing)")
    p_up.add_argument("--redis-url", help="external Redis (EPD_REDIS_URL; default: embedded)")
    p_up.add_argument("--transfer-backend", choices=["mooncake", "shm"], help="EPD_TRANSFER_BACKEND")
    p_up.set_defaults(func=_cmd_up)

    p_serve = sub.add_parser("serve", help="run one service in the foreground (config from EPD_*)")
    p_serve.add_argument("role", choices=ROLES)
    p_serve.set_defaults(func=_cmd_serve)

    p_model = sub.add_parser("model", help="model utilities")
    msub = p_model.add_subparsers(dest="model_command", required=True)
    p_build = msub.add_parser("build", help="build a randomly initialised Qwen2-VL model offline")
    p_build.add_argument("--preset", choices=["tiny", "mid", "2b"], default="tiny")
    p_build.add_argument("--out", required=True, help="output directory")
    p_build.add_argument("--seed", type=int, default=0)
    p_build.set_defaults(func=_cmd_model_build)

    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
