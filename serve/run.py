"""`pidray serve`: start local Ray in-process and run the endpoint on the embedded default model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time

from pipeline.errors import SetupError

TOKEN_ENV = "PIDRAY_API_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Fail with one line when (host, port) cannot be bound, before Ray starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SetupError(f"cannot listen on {host}:{port}: {e.strerror}; pick another port with --port") from None


def read_token(path: str | None) -> str | None:
    """The bearer token from a file (first line), else $PIDRAY_API_TOKEN, else None. Never from the command line."""
    if path:
        try:
            with open(path) as f:
                token = f.readline().strip()
        except OSError as e:
            raise SetupError(f"cannot read the token file {path}: {e.strerror}") from None
        if not token:
            raise SetupError(f"the token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def start(args: dict, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None):
    """Start Ray (reusing RAY_ADDRESS or a running local instance) and deploy the app; returns the base URL."""
    import ray
    from ray import serve

    from serve.app import build_app

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    args = {"bind_host": host, **args}
    serve.run(build_app(args), name="pidray", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def add_serve_parser(sub, parents=()) -> None:
    p = sub.add_parser("serve", parents=list(parents), help="run the upscaling endpoint locally (Ray Serve)")
    p.add_argument("-m", "--model", "--preset", dest="preset", default="small", help="preset (pidray presets)")
    p.add_argument("--weights", default=None, help="hub-layout weights folder, or a checkpoint file")
    p.add_argument("--text-encoder", default=None, help="local Gemma-2-2B-it folder (released presets)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback: set a token)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--token-file",
        default=None,
        help=f"require the bearer token in this file (default: ${TOKEN_ENV}; never on the command line)",
    )
    p.add_argument("--token", help=argparse.SUPPRESS)  # refused with a message: see cmd_serve
    p.add_argument("--allowed-origin", action="append", default=[], help="a web origin allowed to call the API")
    p.add_argument("--allowed-host", action="append", default=[], help="an extra Host header value to accept")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it fails")
    p.set_defaults(fn=cmd_serve)  # fmt: skip


def cmd_serve(args) -> int:
    if args.token:
        raise SetupError(f"--token would show the token to every user of `ps`; put it in a file (--token-file) or "
                         f"${TOKEN_ENV}")  # fmt: skip
    token = read_token(args.token_file)
    if not token and not is_loopback(args.host):
        print(f"warning: no API token and listening on {args.host}: anyone who can reach this port can use the "
              f"endpoint; set ${TOKEN_ENV} or --token-file", file=sys.stderr)  # fmt: skip
    check_port(args.host, args.port)
    conf = {"preset": args.preset, "weights": args.weights, "text_encoder": args.text_encoder,
            "timeout_s": args.timeout, "allowed_origins": args.allowed_origin,
            "allowed_hosts": args.allowed_host}  # fmt: skip
    if token:
        conf["token"] = token
    url = start(conf, args.host, args.port)
    print(f"pidray endpoint on {url}  (POST /v1/upscale, GET /v1/models, /healthz, page at /); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0
