"""`pidray serve`: start local Ray in-process and run the endpoint on the embedded default model.

Everything that would make the endpoint fail to start (an unknown preset, missing weights, a taken port) is checked
before Ray starts and said in one line; Ray's own notices go to a log file, not the terminal."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager

from pipeline.errors import SetupError

RAY_LOG = os.path.join(os.environ.get("TMPDIR", "/tmp"), "pidray-serve.log")
# How long Serve's HTTP server keeps an idle connection open between requests (its default: 90 s, sized for a load
# balancer in front). Locally nothing sits in front: idle connections close after this.
KEEP_ALIVE_S = 5


def check_port(host: str, port: int) -> None:
    """Fail with one line when (host, port) cannot be bound, before Ray starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SetupError(f"cannot listen on {host}:{port}: {e.strerror}; pick another port with --port") from None


def preflight(preset_name: str, weights: str | None, text_encoder: str | None, allow_download: bool = False) -> None:
    """The checks the bulk job makes before any model loads, for the endpoint: the preset exists and upscales, its
    encoder is implemented, its weights (and caption encoder) are here. A SetupError/ValueError saying what and how."""
    from pipeline.model.presets import get_preset
    from pipeline.runtime import ModelOptions, check_encoder, net_path
    from pipeline.weights import WeightsNotFound, caption_encoder_missing, missing_message, resolve

    preset = get_preset(preset_name)
    if not preset.upscales:
        raise SetupError(f"preset {preset.name!r} is a text-to-image model; the endpoint upscales with a PiD preset "
                         "(pidray presets)")  # fmt: skip
    check_encoder(preset)
    missing = []
    try:
        if not preset.bundled and not str(weights or "").endswith((".safetensors", ".pth")):
            resolve(preset, weights, allow_download=allow_download)
        path = net_path(ModelOptions(preset_name, weights, text_encoder, allow_download), preset)
        if not os.path.isfile(path):
            missing.append(f"checkpoint not found: {path}")
    except WeightsNotFound as e:
        missing.append(str(e))
    if preset.captioned and not text_encoder and not allow_download:
        missing.append(caption_encoder_missing(preset.name))
    if missing:
        raise SetupError(missing_message(missing))


@contextmanager
def ray_notices_to_log(enabled: bool = True):
    """Ray's start-up notices, worker messages and the C++ traces of its shutdown (all written to file descriptor
    2) go to RAY_LOG while the block runs; the terminal gets them back after it, errors included."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(RAY_LOG, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def __getattr__(name):
    """serve.admission's TOKEN_ENV and is_loopback, as names of this module: imported when first used (it loads
    FastAPI), so that the parser, --help and the first line of `pidray serve` come at once."""
    if name in ("TOKEN_ENV", "is_loopback"):
        from serve import admission

        return getattr(admission, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Stop(BaseException):
    """SIGTERM while serving: stop as for Ctrl-C."""


def _stop(signum, frame):
    raise _Stop()


def read_token(path: str | None) -> str | None:
    """The bearer token from a file (first line), else $PIDRAY_API_TOKEN, else None. Never from the command line."""
    from serve.admission import TOKEN_ENV

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
    serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": KEEP_ALIVE_S})
    args = {"bind_host": host, **args}
    try:
        serve.run(build_app(args), name="pidray", route_prefix="/", blocking=False)
    except RuntimeError as e:  # a replica failed to start: its reason is in Ray's log
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SetupError(f"the endpoint did not start ({first[:200]}); Ray's messages are in {RAY_LOG}") from None
    return f"http://{host}:{port}"


def add_serve_parser(sub, parents=()) -> None:
    p = sub.add_parser("serve", parents=list(parents))  # its summary: pidray.cli.COMMANDS
    p.add_argument("-m", "--model", "--preset", dest="preset", default="small", help="preset (pidray presets)")
    p.add_argument("--weights", default=None, help="hub-layout weights folder, or a checkpoint file")
    p.add_argument("--text-encoder", default=None, help="local Gemma-2-2B-it folder (released presets)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback: set a token)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--token-file",
        default=None,
        help="require the bearer token in this file (default: $PIDRAY_API_TOKEN; never on the command line)",
    )
    p.add_argument("--token", help=argparse.SUPPRESS)  # refused with a message: see cmd_serve
    p.add_argument("--allowed-origin", action="append", default=[], help="a web origin allowed to call the API")
    p.add_argument("--allowed-host", action="append", default=[], help="an extra Host header value to accept")
    p.add_argument("--with", dest="with_", default=None, metavar="MODEL",
                   help="also POST /v1/generate: this generator's latents (a name of pidray generate --with, or a "
                   "diffusers folder) decoded by the served PiD preset (needs pidray[generate])")  # fmt: skip
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it fails")
    p.add_argument("--allow-download", action="store_true", help="download released weights (NVIDIA licence)")
    p.add_argument("--verbose", action="store_true", help=f"let Ray's own messages through (default: into {RAY_LOG})")
    p.set_defaults(fn=cmd_serve)  # fmt: skip


def cmd_serve(args) -> int:
    from serve.admission import TOKEN_ENV, is_loopback

    if args.token:
        raise SetupError(f"--token would show the token to every user of `ps`; put it in a file (--token-file) or "
                         f"${TOKEN_ENV}")  # fmt: skip
    if args.with_ is not None and not args.with_.strip():  # `--with=`: never an endpoint without the generator
        raise SetupError("--with needs a generator name or a folder")
    token = read_token(args.token_file)
    if not token and not is_loopback(args.host):
        print(f"warning: no API token and listening on {args.host}: anyone who can reach this port can use the "
              f"endpoint; set ${TOKEN_ENV} or --token-file", file=sys.stderr)  # fmt: skip
    preflight(args.preset, args.weights, args.text_encoder, args.allow_download)
    check_port(args.host, args.port)
    conf = {"preset": args.preset, "weights": args.weights, "text_encoder": args.text_encoder,
            "timeout_s": args.timeout, "allowed_origins": args.allowed_origin,
            "allowed_hosts": args.allowed_host, "allow_download": args.allow_download}  # fmt: skip
    if args.with_:  # the generator checked (a folder's class too) before Ray starts
        from pipeline.generators import generator_spec
        from pipeline.latents import check_format
        from pipeline.model.presets import get_preset

        check_format(generator_spec(args.with_)[0].family, get_preset(args.preset))
        conf["generate"] = {"with": args.with_}
    if token:
        conf["token"] = token
    old = signal.getsignal(signal.SIGTERM)
    try:
        with ray_notices_to_log(not args.verbose):
            url = start(conf, args.host, args.port)
            signal.signal(signal.SIGTERM, _stop)  # after Ray's start-up, which installs handlers of its own
            routes = "POST /v1/upscale" + (", /v1/generate" if args.with_ else "")
            print(f"pidray endpoint on {url}  ({routes}, GET /v1/models, /healthz, page at /); Ctrl-C stops",
                  flush=True)  # fmt: skip
            try:
                while True:
                    time.sleep(3600)
            except (KeyboardInterrupt, _Stop):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already: a second signal waits for it
                from ray import serve

                serve.shutdown()
                import ray

                ray.shutdown()
    finally:
        signal.signal(signal.SIGTERM, old)
    return 0
