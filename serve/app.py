"""The online endpoint: a FastAPI ingress and one deployment per model stage, composed with handles.

    POST /v1/upscale   image as the raw body or multipart field `image`; parameters as query/form fields
    GET  /v1/models    presets, envelopes, defaults          GET /healthz   200 only once the model is loaded
    GET  /v1/stats     batch sizes seen by the diffuse deployment, in-flight requests
    GET  /             a page to try it

The stage classes are the ones the batch job runs. Admission happens in the ingress, before any work: the token,
the Origin/Host (no cross-site or DNS-rebinding use of a local server), the body's bytes (counted while streaming),
the header's pixels, the output side and the work (pixels diffused × steps); decoding runs off the event loop. Every
refusal is `{"error": ..., "kind": ...}` with the status of its kind (pipeline.errors.HTTP_STATUS): 400 bad input,
401, 403, 408 slow body, 411 no Content-Length, 413 too large, 415 not an image type, 422 bad parameter, 503 +
Retry-After busy, 504 past the deadline (the work is stopped, not left running). Internal errors are 500 with a short
message, never a trace.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress wrapper.

import asyncio
import dataclasses
import hmac
import math
import os
import time
import uuid
from collections import Counter, deque
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline import safejson
from pipeline.errors import HTTP_STATUS, BadParameter, Refused, TooLarge, kind_of
from pipeline.graph import StageGraph, StageSpec, hidden_gpu_env
from pipeline.imageio import output_format, probe
from pipeline.model.presets import ALIASES, PRESETS, get_preset
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions, run_stage
from pipeline.stages.common import check_seed, parse_size, resolve, sampler_steps, work_factor
from pipeline.stages.encode import given_latent_in_hw, plan_for
from pipeline.stages.generate import GenerateStage
from pipeline.stages.latent import LatentStage
from pipeline.stages.merge import MergeStage
from pipeline.t2i import MAX_PROMPT_CHARS, GenerateOptions
from pipeline.tiling import TilePlan, check_output_side, target_size
from serve.deployments import DeploymentArgs, check_drain, deployment_options
from serve.metrics import ServeMetrics
from serve.run import TOKEN_ENV, is_loopback

STATIC = Path(__file__).resolve().parent / "static"
ROW_PARAMS = {"seed": int, "caption": str, "degrade_sigma": float, "format": str, "scale": float, "steps": int,
              "cfg_scale": float, "shift": float, "quality": int}  # fmt: skip


# ---------------------------------------------------------------------------------------------- stage deployments
TILE_COST_CAP = 8  # a request counts as at most this many tiles, so one big image still forms a batch of its own


def batch_cost(rows: list[dict]) -> int:
    return sum(min(TilePlan.from_dict(r["plan"]).n_tiles if "plan" in r else 1, TILE_COST_CAP) for r in rows)


@serve.deployment
class StageDeployment:
    """One deployment per model-holding stage of the graph (named after it): the stage class the job runs, its
    model loaded once per replica, requests batched by `@serve.batch` (sized in tiles) through the same envelope
    (`run_stage`) as the job. A caller that goes away is passed to the stage's `cancel`, so its work stops."""

    def __init__(self, spec: StageSpec, max_batch_tiles: int = 16, batch_wait_s: float = 0.005, threads: int = 0):
        import torch
        from ray.serve import metrics

        if threads:  # a CPU replica: Ray pins OMP_NUM_THREADS to its (fractional) CPU share
            torch.set_num_threads(threads)
        if max_batch_tiles < TILE_COST_CAP:
            raise ValueError(f"max_batch_tiles must be >= {TILE_COST_CAP}, got {max_batch_tiles}")
        self.spec, self.stage = spec, spec.build()
        if hasattr(self.stage, "warmup"):  # before `ready` answers: no request pays for kernel compiles
            self.stage.warmup()
        self.batch_sizes: Counter = Counter()
        self.batch_metric = metrics.Histogram(
            f"pidray_{spec.name}_batch_size", f"requests per {spec.name} batch", boundaries=[1, 2, 4, 8, 16, 32]
        )
        self.run.set_max_batch_size(max_batch_tiles)
        self.run.set_batch_wait_timeout_s(batch_wait_s)

    def ready(self) -> bool:
        return True

    def stats(self) -> dict:
        return {"batch_sizes": dict(self.batch_sizes), "device": str(getattr(self.stage, "device", "cpu")),
                "stopped": getattr(self.stage, "stopped", 0)}  # fmt: skip

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=batch_cost)
    async def run(self, rows: list[dict]) -> list[dict]:
        self.batch_sizes[len(rows)] += 1
        self.batch_metric.observe(len(rows))
        return await asyncio.to_thread(run_stage, self.stage, self.spec.name, rows)

    async def __call__(self, row: dict) -> dict:
        try:
            return await self.run(row)
        except asyncio.CancelledError:  # the caller timed out or disconnected: stop its work at the next step
            cancel = getattr(self.stage, "cancel", None)
            if cancel is not None and row.get("request_id"):
                cancel(row["request_id"])
            raise


# ---------------------------------------------------------------------------------------------- ingress
app = FastAPI(title="pidray", docs_url=None, redoc_url=None, openapi_url=None)


def _error(kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """Every error body has one shape, {"error": message, "kind": kind}; the status comes from the kind."""
    return JSONResponse({"error": message, "kind": kind}, status_code=HTTP_STATUS[kind], headers=headers)


DECODE_PARAMS = ("latent_format", "id", "sigma", "size")  # /v1/decode only
LATENT_INFLATE_FACTOR = 4  # a latent body may inflate (an .npz) to this many times max_bytes
MAX_LATENT_MEMBERS = 1024  # latents one body may hold: its zip directory or header is all that is parsed of others


def parse_params(params: dict, preset, options: UpscaleOptions, s3_configured: bool, extra: tuple = ()) -> dict:
    """A request's parameters -> row overrides, validated by the job's own rules; BadParameter (422) otherwise."""
    unknown = sorted(set(params) - set(ROW_PARAMS) - {"preset", "store", "timeout"} - set(extra))
    if unknown:
        raise BadParameter(f"unknown parameter(s): {unknown}")
    if params.get("preset") and params["preset"] != preset.name and ALIASES.get(params["preset"]) != preset.name:
        # by name only: a preset *file* named by a client would read the server's disk
        raise BadParameter(f"this endpoint serves preset {preset.name!r}, not {str(params['preset'])[:80]!r}")
    store = params.get("store") or None
    if store not in (None, "s3"):
        raise BadParameter(f"store must be 's3' (or absent), got {store!r}")
    if store == "s3" and not s3_configured:
        raise BadParameter("store=s3 is not configured on this endpoint")
    row = {}
    for name, kind in ROW_PARAMS.items():
        if params.get(name) not in (None, ""):
            try:
                row[name] = kind(params[name])
            except ValueError:
                raise BadParameter(f"{name} must be {kind.__name__}, got {params[name]!r}") from None
    if "caption" in row:
        check_text(row["caption"], "caption")
    resolve(options, row)  # validated by the same rules as the job (the seed's range included), before any work
    if "format" in row:
        output_format(None, row["format"])
    if params.get("id"):
        row["latent_id"] = check_text(str(params["id"]), "id")
    if params.get("sigma") not in (None, ""):
        try:
            row["sigma"] = float(params["sigma"])
        except ValueError:
            raise BadParameter(f"sigma must be a number, got {params['sigma']!r}") from None
        if not 0.0 <= row["sigma"] < 1e3:
            raise BadParameter(f"sigma must be >= 0, got {params['sigma']!r}")
    if params.get("size"):
        row["out_size"] = list(parse_size(params["size"]))
    if params.get("latent_format"):
        from pipeline.latents import check_format

        check_format(params["latent_format"], preset)
        row["latent_format"] = params["latent_format"]
    return row


MAX_JSON_BYTES = 256 << 10  # a /v1/generate body: two prompts of MAX_PROMPT_CHARS, even \u-escaped, fit many times
# /v1/generate's fields: the JSON types each may have (bool is never a number here)
JSON_FIELDS = {"prompt": (str,), "negative_prompt": (str,), "seed": (int,), "steps": (int,), "quality": (int,),
               "shift": (int, float), "cfg_scale": (int, float), "timeout": (int, float), "size": (str, list),
               "upscale": (bool,), "format": (str,)}  # fmt: skip
JSON_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "[width, height]",
    bool: "true or false",
}


def check_text(value: str, name: str) -> str:
    """A prompt-like text: at most MAX_PROMPT_CHARS, and real text (no lone surrogates, which no encoder takes)."""
    if len(value) > MAX_PROMPT_CHARS:
        raise TooLarge(f"{name} is {len(value):,} characters, over the limit of {MAX_PROMPT_CHARS:,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadParameter(f"{name} is not valid text (it holds a lone UTF-16 surrogate, e.g. an unpaired \\ud800)")
    return value


def check_json_fields(req: dict) -> dict:
    """Every field of a /v1/generate body of its type and finite before anything uses it (BadParameter naming the
    field and what it got); texts bounded and valid; a size list of two integers."""
    for name, value in req.items():
        if value is None:
            continue
        types = JSON_FIELDS[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join(JSON_TYPE_NAMES[t] for t in types)
            raise BadParameter(f"{name} must be {want}, got {type(value).__name__} {str(value)[:40]}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BadParameter(f"{name} must be a finite number, got {value}")
        if isinstance(value, str) and name in ("prompt", "negative_prompt", "format"):
            check_text(value, name)
        if name == "size" and isinstance(value, list):
            if len(value) != 2 or not all(type(v) is int for v in value):
                raise BadParameter(f'size must be "WIDTHxHEIGHT" or [width, height] integers, got {str(value)[:40]}')
    return req


def latent_name(data: bytes) -> str:
    """A file name for a latent body from its first bytes (safetensors, .npy, .npz), else a 400."""
    if data[:6] == b"\x93NUMPY":
        return "request.npy"
    if data[:4] == b"PK\x03\x04":
        return "request.npz"
    if len(data) > 9 and data[8:9] == b"{":
        return "request.safetensors"
    raise Refused("bad_input", "the body is not a latent file (.safetensors, .npy or .npz)")


@app.exception_handler(Exception)
async def _unhandled(request: Request, exc: Exception):  # anything FastAPI itself raises: our shape, no trace
    return _error("internal", f"internal error: {type(exc).__name__}")


RAW_TYPES = ("image/", "application/octet-stream")  # a raw body must say it is a file; text/plain is refused
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    """Admission (auth, origin/host, size, work), decode off the event loop, then the stage chain with a deadline."""

    def __init__(self, handles: dict[str, DeploymentHandle], args):
        # The graph's stages in order: a model-holding stage is a deployment of its own (a handle); the others run
        # right here in the ingress replica, off the event loop, instead of costing a hop.
        graph = StageGraph(args.model_options(), UpscaleOptions.from_dict(args.options))
        self.chain = [(s.name, handles[s.name] if s.holds_model else s.build()) for s in graph.stages]
        # /v1/generate: PixelDiT's deployment, then the merge here, or (upscale) the upscale chain from encode on
        self.gen_chain = self.gen_up_chain = None
        gen_model = args.generate_model()
        if gen_model is not None:
            self.gen_preset = get_preset(gen_model.preset)
            self.gen_defaults = GenerateOptions.from_dict((args.generate or {}).get("options", {}))
            self.gen_chain = [("generate", handles["generate"]), ("merge", MergeStage(graph.options))]
            if graph.preset.task == "upscale":  # then PiD: the upscale chain from its encode stage on
                self.gen_up_chain = [("generate", handles["generate"])] + [c for c in self.chain if c[0] != "decode"]
        # /v1/decode: the same deployments from the encode stage on (the encode replica plans and embeds the caption
        # of a given latent without its VAE); the latent stage runs here. Presets without a latent decoder: none.
        self.decode_chain = None
        if graph.preset.decodes_latents:
            dg = StageGraph(args.model_options(), UpscaleOptions.from_dict(args.options), workflow="decode")
            self.decode_chain = [(s.name, handles[s.name] if s.name in handles else s.build()) for s in dg.stages]
            self.decode_spec = dg.stages[0]
        self.probe_handle = handles[graph.model_stages()[-1].name]  # /healthz: the last model stage is loaded
        self.args, self.preset, self.options = args, graph.preset, graph.options
        self.max_bytes, self.timeout_s, self.body_timeout_s = args.max_bytes, args.timeout_s, args.body_timeout_s
        self.max_cost, self.max_in_flight, self.output_s3 = args.max_cost_mpx_steps, args.max_in_flight, args.output_s3
        self.token = args.token or os.environ.get(TOKEN_ENV) or None
        if args.require_token and not self.token:
            raise RuntimeError(f"require_token is set but no token was given (args or ${TOKEN_ENV}): not starting")
        self.allowed_origins = {o.rstrip("/") for o in args.allowed_origins}
        # Bound to loopback, only loopback names are accepted as Host (DNS rebinding); elsewhere any Host unless listed.
        self.allowed_hosts = set(args.allowed_hosts) | (LOOPBACK_HOSTS if is_loopback(args.bind_host) else set())
        self.local_slots = asyncio.Semaphore(args.decode_concurrency)  # bounds decoded pixels in the ingress
        self.latent_slots = asyncio.Semaphore(args.decode_concurrency)  # latent parsing: never an upscale's slot
        if self.decode_chain is not None:
            self.latent_stage = self._latent_stage(None)
        self.in_flight = 0
        self.refused: Counter = Counter()
        self.latencies: deque = deque(maxlen=2048)
        self.metrics = ServeMetrics()

    # -------------------------------------------------------------------------------- admission
    def _authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        got = request.headers.get("authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.token.encode())

    def _check_site(self, request: Request) -> None:
        """Refuse cross-site browser requests and, on loopback, Host names that are not ours (DNS rebinding)."""
        host = request.headers.get("host", "")
        if self.allowed_hosts:
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host not in self.allowed_hosts and name not in self.allowed_hosts:
                raise Refused("forbidden", f"Host {host!r} is not served here (allowed: {sorted(self.allowed_hosts)})")
        origin = request.headers.get("origin")
        if origin is not None:
            own = {f"http://{host}", f"https://{host}"}
            if origin.rstrip("/") not in own | self.allowed_origins:
                raise Refused("forbidden", f"cross-site request from Origin {origin!r} refused; an operator can allow "
                                           "it with allowed_origins")  # fmt: skip

    async def _read_body(self, request: Request, limit: int | None = None) -> bytearray:
        """The body, counted while it streams in: over the limit (max_bytes) stops reading at once, whatever the
        header said."""
        limit = limit or self.max_bytes
        length = request.headers.get("content-length")
        if length is None:  # chunked: Serve's proxy would queue the whole body before we could stop reading it
            raise Refused("length_required", "send the body with a Content-Length (chunked uploads are not accepted)")
        if not length.isdigit():
            raise Refused("bad_input", "Content-Length is not a number")
        if int(length) > limit:
            raise TooLarge(f"request body is {int(length):,} bytes, over the limit of {limit:,}")
        body = bytearray()  # one buffer, no join copy
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise TooLarge(f"request body is over the limit of {limit:,} bytes")
            body += chunk
        return body

    async def _read_image(self, request: Request, field: str = "image") -> tuple[bytes, dict]:
        ctype = request.headers.get("content-type", "").lower()
        body = await self._read_body(request)
        if not ctype.startswith("multipart/form-data"):
            raw = RAW_TYPES if field == "image" else ("application/octet-stream",)
            if not ctype.startswith(raw):
                what = "image/* or application/octet-stream" if field == "image" else "application/octet-stream"
                raise Refused(
                    "unsupported_media",
                    f"Content-Type {ctype or '(none)'!r}: send the {field} as {what}, or as the multipart field "
                    f"'{field}'",
                )
            return body, {}
        request._body = body  # Starlette parses the form from the bounded body we already hold
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as e:  # malformed multipart: a 400 with our shape, not the framework's
            raise Refused("bad_input", f"malformed multipart body: {e}") from None
        upload = form.get(field)
        if upload is None or isinstance(upload, str):
            raise Refused("bad_input", f"multipart request needs a file field named '{field}'")
        data = await upload.read()
        return data, {k: v for k, v in form.items() if k != field and isinstance(v, str)}

    def _busy(self) -> JSONResponse:
        return _error("busy", f"the endpoint is busy ({self.max_in_flight} requests in progress); retry shortly",
                      {"Retry-After": "2"})  # fmt: skip

    async def _within_body_timeout(self, read):
        """The request body (`read`: a coroutine reading it), or a 408 refusal when it does not arrive in time."""
        try:
            return await asyncio.wait_for(read, timeout=self.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refused("slow_client", f"the request body did not arrive within {self.body_timeout_s:g}s") from None

    def _timeout(self, params: dict) -> float:
        if params.get("timeout") in (None, ""):
            return self.timeout_s
        try:
            t = float(params["timeout"])
        except (TypeError, ValueError):
            raise BadParameter(f"timeout must be a number of seconds, got {params['timeout']!r}") from None
        if not 0 < t <= self.timeout_s:
            raise BadParameter(f"timeout must be in (0, {self.timeout_s:g}] seconds, got {t:g}")
        return t

    def _admit(self, in_hw: tuple[int, int], row: dict) -> None:
        """Bound the work one request may ask for: output side, and pixels diffused × steps."""
        opts = row["opts"]
        plan = plan_for(self.preset, opts, in_hw)
        check_output_side(target_size(plan.in_hw, plan.sr_scale, opts.scale), opts.max_output_side)
        th, tw = plan.tile_out
        steps = sampler_steps(self.preset, opts)
        factor = work_factor(self.preset, opts, (th, tw))  # the ensemble's pass, or guidance's second forward
        cost = plan.n_tiles * th * tw * steps * factor / 1e6
        if cost > self.max_cost:
            raise TooLarge(
                f"this request needs {cost:.1f} Mpx·steps of diffusion ({plan.n_tiles} tiles of {tw}x{th} x "
                f"{steps} steps x {factor:.2f} passes), over this endpoint's limit of {self.max_cost:g}; send a "
                "smaller image or fewer steps, or use the bulk job (pidray upscale)"
            )

    async def _pipeline(self, row: dict, chain=None) -> dict:
        """The row through the graph: local stages in a thread (a few at a time), model stages through handles."""
        for name, target in chain or self.chain:
            if isinstance(target, DeploymentHandle):
                row = await target.remote(row)
            else:
                async with self.local_slots:
                    row = (await asyncio.to_thread(run_stage, target, name, [row]))[0]
            if row.get("status") == "failed":
                break
        return row

    # -------------------------------------------------------------------------------- routes
    @app.post("/v1/upscale")
    async def upscale(self, request: Request):
        return await self._handle(self._upscale, request)

    @app.post("/v1/decode")
    async def decode(self, request: Request):
        return await self._handle(self._decode, request)

    @app.post("/v1/generate")
    async def generate(self, request: Request):
        return await self._handle(self._generate, request)

    async def _generate(self, request: Request):
        """JSON {"prompt", and optionally seed, size "WxH", steps, shift, cfg_scale, negative_prompt, upscale,
        format, quality, timeout} -> the image (PixelDiT; with upscale, then the served PiD preset)."""
        if self.gen_chain is None:
            return _error("bad_parameter", "this endpoint does not generate images (start it with generate="
                          "{preset: pixeldit-2k, ...})")  # fmt: skip
        if self.in_flight > self.max_in_flight:
            return self._busy()
        if not request.headers.get("content-type", "").lower().startswith("application/json"):
            return _error("unsupported_media", 'send the request as application/json: {"prompt": ...}')
        body = await self._within_body_timeout(self._read_body(request, MAX_JSON_BYTES))
        req = safejson.loads(bytes(body), "the body", MAX_JSON_BYTES, max_depth=4)
        if not isinstance(req, dict):
            return _error("bad_input", "the body must be a JSON object with a prompt")
        known = {"prompt", "seed", "size", "steps", "shift", "cfg_scale", "negative_prompt", "upscale", "format",
                 "quality", "timeout"}  # fmt: skip
        unknown = sorted(set(req) - known)
        if unknown:
            raise BadParameter(f"unknown field(s): {[str(u)[:40] for u in unknown][:10]}")
        req = check_json_fields(req)
        prompt = req.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadParameter("prompt must be a non-empty string")
        gen = {k: req[k] for k in ("steps", "shift", "cfg_scale", "negative_prompt") if req.get(k) is not None}
        if req.get("size") is not None:
            gen["size"] = parse_size(req["size"])
        try:
            seed = check_seed(req.get("seed", self.options.seed))
            o = GenerateOptions.from_dict({**self.gen_defaults.to_dict(), **gen, "seed": seed}).resolved(
                self.gen_preset
            )
        except (TypeError, ValueError) as e:
            raise BadParameter(str(e)) from None
        upscale = req.get("upscale", False)
        if not isinstance(upscale, bool):
            raise BadParameter(f"upscale must be true or false, got {upscale!r}")
        if upscale and self.gen_up_chain is None:
            raise BadParameter(f"this endpoint's preset {self.preset.name!r} cannot upscale the result")
        over = {k: req[k] for k in ("format", "quality") if req.get(k) is not None}
        row = {"key": "prompt", "prompt": prompt, "gen": {**gen, "seed": seed}, "seed": seed, **over}
        row["opts"] = resolve(self.options, {"seed": seed, **over})
        if "format" in over:
            output_format(None, over["format"])
        cost = o.size[0] * o.size[1] * o.steps * (2 if o.cfg_scale != 1.0 else 1) / 1e6
        if cost > self.max_cost:
            raise TooLarge(
                f"this request needs {cost:.1f} Mpx·steps of sampling, over this endpoint's limit of "
                f"{self.max_cost:g}; ask for a smaller size or fewer steps, or use pidray generate --prompts"
            )
        if upscale:
            self._admit(tuple(o.size), row)
        timeout = self._timeout({"timeout": req.get("timeout")})
        row.update(request_id=uuid.uuid4().hex, deadline=time.time() + timeout)
        chain = self.gen_up_chain if upscale else self.gen_chain
        try:
            row = await asyncio.wait_for(self._pipeline(row, chain), timeout=timeout)
        except asyncio.TimeoutError:
            return _error("cancelled", f"generate did not finish within {timeout:g}s; its work was stopped")
        return await self._respond(row, {})

    async def _handle(self, fn, request: Request):
        t0 = time.perf_counter()
        status = 500
        self.in_flight += 1
        self.metrics.queue(self.in_flight)
        try:
            try:
                if not self._authorized(request):  # every route: the token, then the site, before anything else
                    resp = _error("unauthorized", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
                else:
                    self._check_site(request)
                    resp = await fn(request)
            except Exception as e:  # typed refusals and errors: status from the kind, message without a trace
                kind = kind_of(e)
                resp = _error(kind, str(e) if kind != "internal" else f"internal error: {type(e).__name__}")
            status = resp.status_code
            return resp
        finally:
            self.in_flight -= 1
            dt = time.perf_counter() - t0
            self.latencies.append(dt)
            self.metrics.request(status, dt)
            self.metrics.queue(self.in_flight)
            if status != 200:
                self.refused[status] += 1

    async def _upscale(self, request: Request):
        if self.in_flight > self.max_in_flight:
            return self._busy()
        arrived = time.time()
        data, fields = await self._within_body_timeout(self._read_image(request))
        params = {**dict(request.query_params), **fields}
        row = {"key": "request", "bytes": data,
               **parse_params(params, self.preset, self.options, s3_configured=bool(self.output_s3))}  # fmt: skip
        row["opts"] = resolve(self.options, row)  # once, where the request enters
        timeout = self._timeout(params)
        in_hw = await asyncio.to_thread(probe, data, max_pixels=self.options.max_pixels)  # header only
        self._admit(in_hw, row)
        row.update(request_id=uuid.uuid4().hex, deadline=arrived + timeout)  # from arrival, the body's time included
        try:
            row = await asyncio.wait_for(self._pipeline(row), timeout=max(0.0, arrived + timeout - time.time()))
        except asyncio.TimeoutError:
            return _error("cancelled", f"upscale did not finish within {timeout:g}s; its work was stopped")
        return await self._respond(row, params)

    async def _decode(self, request: Request):
        """A latent file in (raw application/octet-stream, or the multipart field 'latent'), the decoded image out."""
        if self.decode_chain is None:
            return _error("bad_parameter", f"preset {self.preset.name!r} has no latent decoder ({self.preset.vae} "
                          "conditioning); serve a VAE preset to decode latents")  # fmt: skip
        if self.in_flight > self.max_in_flight:
            return self._busy()
        arrived = time.time()
        timeout = self._timeout(dict(request.query_params))
        data, fields = await self._within_body_timeout(self._read_image(request, "latent"))
        params = {**dict(request.query_params), **fields}
        row = {"key": latent_name(bytes(data[:16])), "bytes": bytes(data),
               **parse_params(params, self.preset, self.options, bool(self.output_s3), DECODE_PARAMS)}  # fmt: skip
        row["opts"] = resolve(self.options, row)
        timeout = self._timeout(params)
        deadline = arrived + timeout  # from arrival: the body and the latent's parsing count too
        rest = self.decode_chain[1:]
        stage = self.latent_stage
        if row.get("latent_format"):
            stage = self._latent_stage(row.pop("latent_format"))
        try:  # parse + check the latent here, before it costs any model time, in slots of its own
            row = await self._parse_latent(stage, row, deadline)
        except asyncio.TimeoutError:
            return _error("cancelled", f"decode did not finish within {timeout:g}s (reading the latent); stopped")
        if row.get("status") == "failed":
            return _error(row.get("error_kind") or "internal", row.get("error", "failed"))
        self._admit(given_latent_in_hw(self.preset, row["latent"].shape[1:], row.get("out_size")), row)
        row.update(request_id=uuid.uuid4().hex, deadline=deadline)
        try:
            row = await asyncio.wait_for(self._pipeline(row, rest), timeout=max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            return _error("cancelled", f"decode did not finish within {timeout:g}s; its work was stopped")
        return await self._respond(row, params)

    def _latent_stage(self, latent_format: str | None) -> LatentStage:
        """The decode graph's latent stage with the endpoint's bounds: what one body may inflate to and hold."""
        spec = self.decode_spec
        kw = {**spec.kwargs, "max_bytes": LATENT_INFLATE_FACTOR * self.max_bytes, "max_members": MAX_LATENT_MEMBERS}
        if latent_format is not None:
            kw["latent_format"] = latent_format
        return dataclasses.replace(spec, kwargs=kw).build()

    async def _parse_latent(self, stage, row: dict, deadline: float) -> dict:
        """The latent stage on a thread, at most decode_concurrency at a time in slots apart from the upscale
        decode's; past the deadline the request is answered (504) while its slot stays held until the thread ends,
        so a slow parse never lets more than the slots' worth run."""
        await asyncio.wait_for(self.latent_slots.acquire(), timeout=max(0.0, deadline - time.time()))
        work = asyncio.ensure_future(asyncio.to_thread(run_stage, stage, "latent", [row]))
        work.add_done_callback(lambda _: self.latent_slots.release())
        return (await asyncio.wait_for(asyncio.shield(work), timeout=max(0.0, deadline - time.time())))[0]

    async def _respond(self, row: dict, params: dict) -> Response:
        if row.get("status") != "ok":
            return _error(row.get("error_kind") or "internal", row.get("error", "failed"))
        headers = {
            "X-Pidray-Seed": str(row.get("seed", self.options.seed)),
            "X-Pidray-Size": f"{row['out_hw'][1]}x{row['out_hw'][0]}",
            "X-Pidray-Timings": ",".join(f"{k}={v:.3f}" for k, v in row.get("timings", {}).items()),
            "X-Pidray-Batch": str(row.get("batch", 1)),
        }
        if row.get("notes"):
            headers["X-Pidray-Notes"] = "; ".join(row["notes"])[:500].encode("ascii", "replace").decode()
        if params.get("store") == "s3":
            return await self._store(row, headers)
        return Response(row["output"], media_type=row["content_type"], headers=headers)

    async def _store(self, row: dict, headers: dict) -> Response:
        from pipeline.storage import Location, S3Settings

        loc = Location(self.output_s3["uri"], S3Settings(**self.output_s3.get("s3", {})))
        key = f"{uuid.uuid4().hex}{row['extension']}"
        await asyncio.to_thread(loc.write, key, row["output"])
        return JSONResponse({"uri": f"{loc.uri.rstrip('/')}/{key}", "key": key, "size": headers["X-Pidray-Size"]},
                            headers=headers)  # fmt: skip

    @app.get("/v1/models")
    def models(self):
        p = self.preset
        return {
            "served": p.name,
            "defaults": self.options.to_dict(),
            "limits": {"max_bytes": self.max_bytes, "max_pixels": self.options.max_pixels,
                       "max_output_side": self.options.max_output_side, "max_cost_mpx_steps": self.max_cost,
                       "timeout_s": self.timeout_s},
            "presets": {n: {"scale": q.scale, "envelope": q.envelope, "variant": q.variant, "vae": q.vae,
                            "served": n == p.name} for n, q in PRESETS.items()},
        }  # fmt: skip

    @app.get("/healthz")
    async def healthz(self):
        try:
            await asyncio.wait_for(self.probe_handle.ready.remote(), timeout=5)
        except Exception:
            return _error("busy", "model not loaded yet", {"Retry-After": "5"})
        return {"status": "ok", "preset": self.preset.name}

    @app.get("/v1/stats")
    async def stats(self):
        lat = sorted(self.latencies)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa: E731
        stages = {n: await t.stats.remote() for n, t in self.chain if isinstance(t, DeploymentHandle)}
        return {"in_flight": self.in_flight, "requests": len(lat), "p50_s": pct(0.5), "p99_s": pct(0.99),
                "refused": dict(self.refused), "stages": stages, **stages.get("diffuse", {})}  # fmt: skip

    @app.get("/")
    def page(self):
        return HTMLResponse((STATIC / "index.html").read_text())


def deployment_names(preset: str) -> list[str]:
    """The deployments `build_app` creates for a preset: the graph's model-holding stages, plus the ingress."""
    return ["ingress"] + [s.name for s in StageGraph(ModelOptions(preset=preset)).model_stages()]


class AppArgs(BaseModel):
    """The endpoint's arguments (`serve/config.yaml` args, `pidray serve`), typed and validated once."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "small"
    weights: str | None = None
    text_encoder: str | None = None
    allow_download: bool = False
    device: str = "auto"
    dtype: str = "auto"
    kernels: str | None = None  # "auto" | "torch" | "triton"
    options: dict = Field(default_factory=dict)  # UpscaleOptions defaults for every request
    deployments: dict[str, DeploymentArgs] = Field(default_factory=dict)  # per deployment: its Serve options
    gpu: bool | None = None  # None: whether the cluster has GPUs
    max_batch_tiles: int = 16
    batch_wait_s: float = 0.005
    threads: int = 0  # torch threads per CPU replica (0: the machine's cores)
    max_bytes: int = 50 << 20
    timeout_s: float = 120.0
    body_timeout_s: float = 30.0
    max_cost_mpx_steps: float | None = None  # None: 1000 with a GPU, 8 on CPUs
    max_in_flight: int = 16
    decode_concurrency: int = 2
    token: str | None = None
    require_token: bool = False
    output_s3: dict | None = None  # {"uri": "s3://bucket/prefix", "s3": {S3Settings fields}}
    allowed_origins: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    bind_host: str = ""
    # /v1/generate: a text-to-image preset served beside the PiD one, e.g. {"preset": "pixeldit-2k", "weights": DIR,
    # "text_encoder": DIR, "options": {GenerateOptions defaults}}; None: no text-to-image on this endpoint
    generate: dict | None = None

    @model_validator(mode="after")
    def _drain_covers_the_deadline(self):
        check_drain(self.deployments, self.timeout_s)
        return self

    def generate_model(self) -> ModelOptions | None:
        if not self.generate:
            return None
        g = self.generate
        unknown = sorted(set(g) - {"preset", "weights", "text_encoder", "options"})
        if unknown or "preset" not in g:
            raise ValueError(f"generate needs a preset and takes weights, text_encoder, options; got {sorted(g)}")
        return ModelOptions(g["preset"], g.get("weights"), g.get("text_encoder") or self.text_encoder,
                            self.allow_download, self.device, self.dtype, self.kernels)  # fmt: skip

    def model_options(self) -> ModelOptions:
        return ModelOptions(self.preset, self.weights, self.text_encoder, self.allow_download, self.device, self.dtype,
                            self.kernels)  # fmt: skip


def build_app(args: dict | AppArgs | None = None):
    """Serve application builder (`serve run serve.app:build_app preset=small`): one deployment per model stage."""
    try:
        a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    except ValidationError as e:
        raise ValueError(f"invalid endpoint arguments: {e}") from None
    UpscaleOptions.from_dict(a.options)  # refuses unknown or out-of-range options here, not in a replica
    gpu = _has_gpu() if a.gpu is None else a.gpu
    updates = {"gpu": gpu, "max_cost_mpx_steps": a.max_cost_mpx_steps or (1000.0 if gpu else 8.0),
               "threads": a.threads or (0 if gpu else os.cpu_count() or 1)}  # fmt: skip
    a = a.model_copy(update=updates)
    graph = StageGraph(a.model_options(), UpscaleOptions.from_dict(a.options))
    handles = {}
    specs = graph.model_stages()
    gen_model = a.generate_model()
    if gen_model is not None:  # text-to-image beside PiD: half of each GPU for each
        gen_opts = GenerateOptions.from_dict((a.generate or {}).get("options", {}))
        gen_opts.resolved(get_preset(gen_model.preset))  # refused here, not in a replica
        if get_preset(gen_model.preset).task != "t2i":
            raise ValueError(f"generate.preset {gen_model.preset!r} is not a text-to-image preset")
        specs = [dataclasses.replace(s, gpu_share=s.gpu_share * 0.5) for s in specs]
        specs.append(StageSpec("generate", GenerateStage, {"model": dataclasses.asdict(gen_model), "options":
                                                           gen_opts.to_dict(), "emit": "both"}, True, True,
                               batch_rows=4, gpu_share=0.5))  # fmt: skip
    unknown = sorted(set(a.deployments) - {"ingress", *(s.name for s in specs)})
    if unknown:
        raise ValueError(f"deployments: no deployment named {unknown} in this app (it has "
                         f"{['ingress'] + [s.name for s in specs]})")  # fmt: skip
    for spec in specs:
        conf = deployment_options(spec.name, a.deployments, a.timeout_s)
        if gpu:  # the graph's declaration: a GPU stage's share of a card; a CPU stage with CUDA hidden
            conf["ray_actor_options"] = {**conf.get("ray_actor_options", {}), **spec.ray_options(1)}
        handles[spec.name] = StageDeployment.options(name=spec.name, **conf).bind(
            spec, max_batch_tiles=a.max_batch_tiles, batch_wait_s=a.batch_wait_s, threads=a.threads
        )
    ingress = deployment_options("ingress", a.deployments, a.timeout_s)
    if gpu:  # decode and merge run in the ingress: never on a GPU
        opts = ingress.get("ray_actor_options", {})
        ingress["ray_actor_options"] = {**opts, "runtime_env": hidden_gpu_env()}
    return Ingress.options(**ingress).bind(handles, a)


def _has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
