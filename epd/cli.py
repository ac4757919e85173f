"""The ``epd`` command: ``epd up``, ``epd serve ROLES``, ``epd health|stats|drain|switch ADDR``, ``epd model build``,
``epd bench serve|compare``,
``epd profile``, ``epd plan``."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

from epd import config

ROLES_HELP = "gateway, or backend roles: encoder | prefill | decode | a co-located set such as EP, PD, encoder,prefill"


def _cmd_up(args: argparse.Namespace) -> int:
    from epd.launcher import up

    overrides = {
        "encoders": args.encoders, "prefills": args.prefills, "decodes": args.decodes,
        "gateway_port": args.port, "gateway_host": args.host, "model": args.model,
        "redis_url": args.redis_url, "transfer_backend": args.transfer_backend, "topology": args.topology,
    }
    cfg = config.load(config.LauncherConfig, **overrides)
    return up(cfg)


def _cmd_serve(args: argparse.Namespace) -> int:
    from epd.topology import parse_roles

    if args.role == "gateway":
        module = "services.gateway"
    else:
        try:
            roles = parse_roles(args.role)
        except ValueError as exc:
            raise config.ConfigError(f"epd serve: {exc}") from None
        if len(roles) == 1:
            module = f"services.{roles[0]}"
        else:
            os.environ["EPD_ROLES"] = ",".join(roles)  # read by services.host through epd.config
            module = "services"
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


def _admin_token() -> bytes | None:
    """The admin token from EPD_CLUSTER_SECRET (or _FILE); ``None`` when neither is set.

    Raises:
        config.ConfigError: the secret is unreadable or too short.
    """
    from epd.wire.auth import admin_token, load_secret

    cfg = config.load(config.ClusterSecretConfig)
    return admin_token(load_secret(cfg.cluster_secret, cfg.cluster_secret_file))


def _cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when SERVING (compose healthchecks use this), 1 otherwise."""
    from epd.admin import AdminError, check_health

    try:
        status = check_health(args.address, args.service, timeout_s=args.timeout, token=_admin_token())
    except AdminError as exc:
        print(f"UNREACHABLE {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _cmd_stats(args: argparse.Namespace) -> int:
    from epd.admin import AdminError, get_stats, stats_dict

    try:
        reply = get_stats(args.address, args.role, timeout_s=args.timeout, token=_admin_token())
        print(json.dumps(stats_dict(reply), indent=2))
    except AdminError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _cmd_drain(args: argparse.Namespace) -> int:
    from epd.admin import AdminError, drain, stats_dict

    try:
        reply = drain(args.address, args.role, drain_timeout_s=args.drain_timeout, timeout_s=args.timeout,
                      token=_admin_token())
    except AdminError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(stats_dict(reply), indent=2))
    return 0


def _cmd_switch(args: argparse.Namespace) -> int:
    from epd.admin import AdminError, stats_dict, switch_role

    try:
        reply = switch_role(args.address, args.from_role, args.to_role, drain_timeout_s=args.drain_timeout,
                            timeout_s=args.timeout, token=_admin_token())
    except AdminError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not reply.ok:
        print(f"switch refused: {reply.message}", file=sys.stderr)
        return 1
    out = {"instance_id": reply.instance_id, "weights_reused": reply.weights_reused,
           "seconds": {"offload": round(reply.offload_s, 4), "migrate": round(reply.migrate_s, 4),
                       "onload": round(reply.onload_s, 4)}, **stats_dict(reply)}
    print(json.dumps(out, indent=2))
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
    p_up.add_argument("--transfer-backend", choices=["mooncake", "shm"],
                      help="EPD_TRANSFER_BACKEND (default: shm on cpu, mooncake on cuda/npu)")
    p_up.add_argument("--topology", help="EPD_TOPOLOGY, e.g. E-P-D, EP-D, E-PD, EPD, (E-P)-D, 2E-1P-1D "
                      "(overrides the counts; see README 'Topologies')")
    p_up.set_defaults(func=_cmd_up)

    p_serve = sub.add_parser("serve", help="run one process in the foreground (config from EPD_*)")
    p_serve.add_argument("role", help=ROLES_HELP)
    p_serve.set_defaults(func=_cmd_serve)

    for name, fn, helptext in (
        ("health", _cmd_health, "gRPC health check of a backend process (exit 0 when SERVING)"),
        ("stats", _cmd_stats, "load + capacity of a backend process's roles (JSON; sends the admin token "
                              "derived from EPD_CLUSTER_SECRET or EPD_CLUSTER_SECRET_FILE when set)"),
        ("drain", _cmd_drain, "drain a backend process: no new work, finish in-flight, deregister, exit "
                              "(needs EPD_CLUSTER_SECRET or _FILE when the deployment has one)"),
        ("switch", _cmd_switch, "switch one role of a backend process to another in place: offload, migrate, "
                                "onload (EPD paper role switching; needs the admin token like drain)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("address", help="admin address host:port (EPD_ADMIN_PORT; registry field 'admin')")
        p.add_argument("--timeout", type=float, default=3.0, help="RPC deadline in seconds")
        if name == "health":
            p.add_argument("--service", default="", help="role to check (default: the whole process)")
        elif name == "switch":
            p.add_argument("--from", dest="from_role", required=True, help="the hosted role to give up")
            p.add_argument("--to", dest="to_role", required=True, help="encoder, prefill or decode")
            p.add_argument("--drain-timeout", type=float, default=0.0,
                           help="offload: seconds for in-flight work before it migrates (0: EPD_DRAIN_TIMEOUT_S)")
            p.set_defaults(timeout=120.0)
        else:
            p.add_argument("--role", default="", help="only this role (default: every hosted role)")
        if name == "drain":
            p.add_argument("--drain-timeout", type=float, default=0.0, help="seconds (0: EPD_DRAIN_TIMEOUT_S)")
        p.set_defaults(func=fn)

    p_model = sub.add_parser("model", help="model utilities")
    msub = p_model.add_subparsers(dest="model_command", required=True)
    p_build = msub.add_parser("build", help="build a randomly initialised Qwen2-VL model offline")
    p_build.add_argument("--preset", choices=["tiny", "mid", "2b"], default="tiny")
    p_build.add_argument("--out", required=True, help="output directory")
    p_build.add_argument("--seed", type=int, default=0)
    p_build.set_defaults(func=_cmd_model_build)

    p_bench = sub.add_parser("bench", help="benchmarks: serve (load an endpoint), compare (deployments side by side)")
    bsub = p_bench.add_subparsers(dest="bench_command", required=True)
    from epd.bench.compare import add_compare_parser
    from epd.bench.serve import add_serve_parser

    add_serve_parser(bsub)
    add_compare_parser(bsub)

    from epd.plan.cli import add_plan_parser, add_profile_parser  # `epd profile`, `epd plan` (epd/plan/)

    add_profile_parser(sub)
    add_plan_parser(sub)

    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
