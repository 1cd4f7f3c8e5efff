"""`pidray serve`: start local Ray in-process and run the endpoint on the embedded default model."""

from __future__ import annotations

import time


def start(args: dict, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None):
    """Start Ray (reusing RAY_ADDRESS or a running local instance) and deploy the app; returns the base URL."""
    import os

    import ray
    from ray import serve

    from serve.app import build_app

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name="pidray", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the upscaling endpoint locally (Ray Serve)")
    p.add_argument("--preset", default="small")
    p.add_argument("--weights", default=None)
    p.add_argument("--text-encoder", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="require this bearer token (default: $PIDRAY_API_TOKEN)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(fn=cmd_serve)


def cmd_serve(args) -> int:
    conf = {"preset": args.preset, "weights": args.weights, "text_encoder": args.text_encoder,
            "timeout_s": args.timeout}  # fmt: skip
    if args.token:
        conf["token"] = args.token
    url = start(conf, args.host, args.port)
    print(f"pidray endpoint on {url}  (POST /v1/upscale, GET /v1/models, /healthz, page at /); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0
