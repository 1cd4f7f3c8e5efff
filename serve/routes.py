"""The endpoint's ingress: FastAPI routes in one Serve deployment, and each route's stage chain.

    POST /v1/upscale   image as the raw body or multipart field `image`; parameters as query/form fields
    POST /v1/decode    a latent file (raw application/octet-stream, or multipart field `latent`)
    POST /v1/generate  JSON {"prompt", ...} (when a text-to-image preset is served beside PiD)
    GET  /v1/models    presets, envelopes, defaults          GET /healthz   200 only once the model is loaded
    GET  /v1/stats     batch sizes seen by the last model deployment, in-flight requests
    GET  /             a page to try it

Each route runs the stages of its workflow (`Chains`, resolved once by the builder): a model-holding stage is a
deployment (a handle), the others run here in the ingress, off the event loop. Consecutive deployments are chained
without awaiting in between — the ingress hands one deployment's response to the next (Serve's model composition),
so an upscale's latent goes from the encode deployment to the diffuse one without passing through here. Admission
(`serve.admission`, `serve.params`) happens before any work. Every refusal is `{"error": ..., "kind": ...}` with the
status of its kind (pipeline.errors.HTTP_STATUS); internal errors are 500 with a short message, never a trace.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress wrapper.

import asyncio
import dataclasses
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline import safejson
from pipeline.errors import HTTP_STATUS, BadParameter, Refused, kind_of
from pipeline.generate_options import GEN_OVERRIDES
from pipeline.graph import StageGraph
from pipeline.imageio import output_format, probe
from pipeline.model.presets import PRESETS
from pipeline.spec import StageSpec
from pipeline.stages import run_stage
from pipeline.stages.common import parse_size
from pipeline.stages.encode import given_latent_in_hw
from pipeline.values import check_seed
from pipeline.workflow import Workflow
from serve.admission import Admission
from serve.metrics import ServeMetrics
from serve.params import (
    DECODE_FIELDS,
    DECODE_PARAMS,
    JSON_FIELDS,
    LATENT_INFLATE_FACTOR,
    MAX_JSON_BYTES,
    MAX_LATENT_MEMBERS,
    check_generate_cost,
    check_json_fields,
    latent_name,
    openapi_doc,
    openapi_generate,
    parse_params,
    served_generator,
    upscale_plan,
)

STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class Chains:
    """The workflows the routes run, resolved once by the builder: /v1/upscale's, /v1/decode's (a preset that decodes
    latents; else None), /v1/generate's without and with the upscale (a text-to-image preset served; else None)."""

    upscale: Workflow
    decode: Workflow | None = None
    generate: Workflow | None = None
    generate_upscale: Workflow | None = None


Link = tuple[StageSpec, object]  # a stage of a chain: its spec, and its deployment's handle or the stage itself


app = FastAPI(title="pidray", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")  # parameters: params.py


def _error(kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """Every error body has one shape, {"error": message, "kind": kind}; the status comes from the kind."""
    return JSONResponse({"error": message, "kind": kind}, status_code=HTTP_STATUS[kind], headers=headers)


@app.exception_handler(Exception)
async def _unhandled(request: Request, exc: Exception):  # anything FastAPI itself raises: our shape, no trace
    return _error("internal", f"internal error: {type(exc).__name__}")


def _run_local(links: list[Link], row: dict) -> dict:
    """A row through stages that run in this process, one after the other, until one fails."""
    for spec, stage in links:
        row = run_stage(stage, spec.name, [row])[0]
        if row.get("status") == "failed":
            break
    return row


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    """Admission (auth, origin/host, size, work), decode off the event loop, then the stage chain with a deadline."""

    def __init__(self, handles: dict[str, DeploymentHandle], workflows: Chains, args):
        self._local: dict[str, object] = {}  # the stages that run here, one instance per stage
        served = [getattr(workflows, f.name) for f in dataclasses.fields(workflows)]
        self.chains = Chains(*(self._links(w, handles) if w is not None else None for w in served))
        self.flows = workflows  # each route's workflow: its `enter` is where a request's row comes in
        up = workflows.upscale
        if workflows.decode is not None:  # the latent is read here, with the endpoint's bounds on one body
            spec = self.chains.decode[0][0]
            kw = {**spec.kwargs, "max_bytes": LATENT_INFLATE_FACTOR * args.max_bytes,
                  "max_members": MAX_LATENT_MEMBERS}  # fmt: skip
            self.chains = replace(
                self.chains, decode=[(spec, replace(spec, kwargs=kw).build()), *self.chains.decode[1:]]
            )
        if workflows.generate is not None:
            self.gen_preset, self.gen_defaults = workflows.generate.preset, workflows.generate.gen
            self.gen_with = served_generator(workflows.generate)
        model_links = [(s, t) for s, t in self.chains.upscale if isinstance(t, DeploymentHandle)]
        self.probe_name, self.probe_handle = model_links[-1][0].name, model_links[-1][1]  # /healthz: the last loaded
        self.model_links = model_links
        self.preset, self.options = up.preset, up.options
        self.gate = Admission(args)
        self.max_cost, self.max_in_flight, self.output_s3 = args.max_cost_mpx_steps, args.max_in_flight, args.output_s3
        self.max_bytes, self.timeout_s = args.max_bytes, args.timeout_s
        self.local_slots = asyncio.Semaphore(args.decode_concurrency)  # bounds decoded pixels in the ingress
        self.latent_slots = asyncio.Semaphore(args.decode_concurrency)  # latent parsing: never an upscale's slot
        self.in_flight = 0
        self.refused: Counter = Counter()
        self.latencies: deque = deque(maxlen=2048)
        self.awaited: Counter = Counter()  # results the ingress itself received, by deployment
        self.metrics = ServeMetrics()

    def _links(self, workflow: Workflow, handles: dict[str, DeploymentHandle]) -> list[Link]:
        """A workflow's stages as a chain: each through its deployment where there is one, else built here (once)."""
        links = []
        for spec in StageGraph(workflow=workflow).stages:
            if spec.name in handles:
                links.append((spec, handles[spec.name]))
            else:
                links.append((spec, self._local.get(spec.name) or self._local.setdefault(spec.name, spec.build())))
        return links

    def received(self) -> dict:
        """How many results the ingress awaited from each deployment (a chained deployment's result goes straight
        to the next one and is not counted: the ingress never held it)."""
        return dict(self.awaited)

    def _busy(self) -> JSONResponse:
        return _error("busy", f"the endpoint is busy ({self.max_in_flight} requests in progress); retry shortly",
                      {"Retry-After": "2"})  # fmt: skip

    def _take_slot(self, request: Request) -> None:
        """One of the max_in_flight work slots, taken once the body is in (a request still receiving its body holds
        none: it is an upload, see Admission); released by `_handle`. Busy (503) when none is free."""
        if self.in_flight >= self.max_in_flight:
            raise Refused("busy", f"the endpoint is busy ({self.max_in_flight} requests in progress); retry shortly")
        self.in_flight += 1
        request.state.work_slot = True
        self.metrics.queue(self.in_flight)

    async def _pipeline(self, row: dict, chain: list[Link]) -> dict:
        """The row through a chain: a run of local stages in one thread (a few rows at a time); a run of
        deployments is chained, each handed the previous one's response unawaited, and only the last one's result
        comes back here. When the caller goes away or the deadline passes, every response of the run is cancelled
        (the stages stop their work at the next step)."""
        i = 0
        while i < len(chain):
            spec, target = chain[i]
            if isinstance(target, DeploymentHandle):
                pending, resp = [], row
                while i < len(chain) and isinstance(chain[i][1], DeploymentHandle):
                    spec, resp = chain[i][0], chain[i][1].remote(resp)
                    pending.append(resp)
                    i += 1
                try:
                    row = await resp
                except BaseException:  # the caller went away, the deadline passed, a stage failed: the run is cancelled
                    for r in pending:
                        r.cancel()
                    raise
                self.awaited[spec.name] += 1
            else:  # a run of local stages: one thread hop for all of them
                local = []
                while i < len(chain) and not isinstance(chain[i][1], DeploymentHandle):
                    local.append(chain[i])
                    i += 1
                async with self.local_slots:
                    row = await asyncio.to_thread(_run_local, local, row)
            if row.get("status") == "failed":
                break
        return row

    # -------------------------------------------------------------------------------- routes
    @app.post("/v1/upscale", openapi_extra=openapi_doc({}, "image"))
    async def upscale(self, request: Request):
        return await self._handle(self._upscale, request)

    @app.post("/v1/decode", openapi_extra=openapi_doc(DECODE_FIELDS, "latent"))
    async def decode(self, request: Request):
        return await self._handle(self._decode, request)

    @app.post("/v1/generate", openapi_extra=openapi_generate())
    async def generate(self, request: Request):
        return await self._handle(self._generate, request)

    async def _generate(self, request: Request):
        """JSON {"prompt", and optionally seed, size "WxH", steps, shift, cfg_scale, negative_prompt, upscale,
        format, quality, timeout} -> the image (PixelDiT; with upscale, then the served PiD preset)."""
        if self.chains.generate is None:
            return _error("bad_parameter", "this endpoint does not generate images (start it with generate="
                          "{preset: pixeldit-2k, ...})")  # fmt: skip
        if self.in_flight >= self.max_in_flight:  # full: refused before its body is read
            return self._busy()
        if not request.headers.get("content-type", "").lower().startswith("application/json"):
            return _error("unsupported_media", 'send the request as application/json: {"prompt": ...}')
        body = await self.gate.within_body_timeout(self.gate.read_body(request, MAX_JSON_BYTES), request)
        self._take_slot(request)
        req = safejson.loads(bytes(body), "the body", MAX_JSON_BYTES, max_depth=4)
        if not isinstance(req, dict):
            return _error("bad_input", "the body must be a JSON object with a prompt")
        unknown = sorted(set(req) - set(JSON_FIELDS))
        if unknown:
            raise BadParameter(f"unknown field(s): {[str(u)[:40] for u in unknown][:10]}")
        req = check_json_fields(req)
        prompt = req.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadParameter("prompt must be a non-empty string")
        fill = self.gen_with.check(req.get("with"), req.get("stop_at"))  # the generator's defaults, or None
        gen = {k: req[k] for k in GEN_OVERRIDES if k != "seed" and req.get(k) is not None}
        if "size" in gen:
            gen["size"] = parse_size(gen["size"])
        try:
            seed = check_seed(req.get("seed", self.options.seed))
            o = replace(self.gen_defaults, **gen, seed=seed).resolved(self.gen_preset, fill)
        except (TypeError, ValueError) as e:
            raise BadParameter(str(e)) from None
        upscale = req.get("upscale", False)
        if not isinstance(upscale, bool):
            raise BadParameter(f"upscale must be true or false, got {upscale!r}")
        if upscale and self.gen_with.spec is not None:
            raise BadParameter("upscale is for a text-to-image preset's image; this endpoint's generator's latent is "
                               f"decoded by {self.preset.name!r} already")  # fmt: skip
        if upscale and self.chains.generate_upscale is None:
            raise BadParameter(f"this endpoint's preset {self.preset.name!r} cannot upscale the result")
        over = {k: req[k] for k in ("format", "quality") if req.get(k) is not None}
        flow = self.flows.generate_upscale if upscale else self.flows.generate
        row = flow.enter({"key": "prompt", "prompt": prompt, "gen": {**gen, "seed": seed}, "seed": seed, **over})
        if "format" in over:
            output_format(None, over["format"])
        check_generate_cost(o, self.max_cost, None if fill is None else o.cfg_scale > 1)  # diffusers: CFG over 1
        if upscale:
            row["planned"] = upscale_plan(self.preset, row["opts"], tuple(o.size), self.max_cost)
        timeout = self.gate.timeout({"timeout": req.get("timeout")})
        row.update(request_id=uuid.uuid4().hex, deadline=time.time() + timeout)
        chain = self.chains.generate_upscale if upscale else self.chains.generate
        try:
            row = await asyncio.wait_for(self._pipeline(row, chain), timeout=timeout)
        except asyncio.TimeoutError:
            return _error("cancelled", f"generate did not finish within {timeout:g}s; its work was stopped")
        return await self._respond(row, {})

    async def _handle(self, fn, request: Request):
        t0 = time.perf_counter()
        status = 500
        try:
            try:
                if not self.gate.authorized(request):  # every route: the token, then the site, before anything else
                    resp = _error("unauthorized", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
                else:
                    self.gate.check_site(request)
                    resp = await fn(request)
            except Exception as e:  # typed refusals and errors: status from the kind, message without a trace
                kind = kind_of(e)
                resp = _error(kind, str(e) if kind != "internal" else f"internal error: {type(e).__name__}",
                              {"Retry-After": "2"} if kind == "busy" else None)  # fmt: skip
            status = resp.status_code
            return resp
        finally:
            if getattr(request.state, "work_slot", False):
                self.in_flight -= 1
            dt = time.perf_counter() - t0
            self.latencies.append(dt)
            self.metrics.request(status, dt)
            self.metrics.queue(self.in_flight)
            if status != 200:
                self.refused[status] += 1

    async def _upscale(self, request: Request):
        if self.in_flight >= self.max_in_flight:  # full: refused before its body is read
            return self._busy()
        arrived = time.time()
        data, fields = await self.gate.within_body_timeout(self.gate.read_image(request), request)
        self._take_slot(request)
        params = {**dict(request.query_params), **fields}
        over = parse_params(params, self.preset, self.options, s3_configured=bool(self.output_s3))
        row = self.flows.upscale.enter({"key": "request", "bytes": data, **over})  # its options resolved, once
        timeout = self.gate.timeout(params)
        in_hw = await asyncio.to_thread(probe, data, max_pixels=self.options.max_pixels)  # header only
        row["planned"] = upscale_plan(self.preset, row["opts"], in_hw, self.max_cost)  # planned once: encode takes it
        row.update(request_id=uuid.uuid4().hex, deadline=arrived + timeout)  # from arrival, the body's time included
        try:
            row = await asyncio.wait_for(self._pipeline(row, self.chains.upscale),
                                         timeout=max(0.0, arrived + timeout - time.time()))  # fmt: skip
        except asyncio.TimeoutError:
            return _error("cancelled", f"upscale did not finish within {timeout:g}s; its work was stopped")
        return await self._respond(row, params)

    async def _decode(self, request: Request):
        """A latent file in (raw application/octet-stream, or the multipart field 'latent'), the decoded image out."""
        if self.chains.decode is None:
            return _error("bad_parameter", f"preset {self.preset.name!r} has no latent decoder ({self.preset.vae} "
                          "conditioning); serve a VAE preset to decode latents")  # fmt: skip
        if self.in_flight >= self.max_in_flight:  # full: refused before its body is read
            return self._busy()
        arrived = time.time()
        timeout = self.gate.timeout(dict(request.query_params))
        data, fields = await self.gate.within_body_timeout(self.gate.read_image(request, "latent"), request)
        self._take_slot(request)
        params = {**dict(request.query_params), **fields}
        over = parse_params(params, self.preset, self.options, bool(self.output_s3), DECODE_PARAMS)
        row = self.flows.decode.enter({"key": latent_name(bytes(data[:16])), "bytes": bytes(data), **over})
        timeout = self.gate.timeout(params)
        deadline = arrived + timeout  # from arrival: the body and the latent's parsing count too
        (spec, stage), rest = self.chains.decode[0], self.chains.decode[1:]
        try:  # parse + check the latent here, before it costs any model time, in slots of its own
            row = await self._parse_latent(spec.name, stage, row, deadline)
        except asyncio.TimeoutError:
            return _error("cancelled", f"decode did not finish within {timeout:g}s (reading the latent); stopped")
        if row.get("status") == "failed":
            return _error(row.get("error_kind") or "internal", row.get("error", "failed"))
        in_hw = given_latent_in_hw(self.preset, row["latent"].shape[1:], row.get("out_size"))
        row["planned"] = upscale_plan(self.preset, row["opts"], in_hw, self.max_cost)
        row.update(request_id=uuid.uuid4().hex, deadline=deadline)
        try:
            row = await asyncio.wait_for(self._pipeline(row, rest), timeout=max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            return _error("cancelled", f"decode did not finish within {timeout:g}s; its work was stopped")
        return await self._respond(row, params)

    async def _parse_latent(self, name: str, stage, row: dict, deadline: float) -> dict:
        """The latent stage on a thread, at most decode_concurrency at a time in slots apart from the upscale
        decode's; past the deadline the request is answered (504) while its slot stays held until the thread ends,
        so a slow parse never lets more than the slots' worth run."""
        await asyncio.wait_for(self.latent_slots.acquire(), timeout=max(0.0, deadline - time.time()))
        work = asyncio.ensure_future(asyncio.to_thread(run_stage, stage, name, [row]))
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
        except Exception:  # a replica not started, gone or slow to answer: not ready yet, never a 500
            return _error("busy", "model not loaded yet", {"Retry-After": "5"})
        return {"status": "ok", "preset": self.preset.name}

    @app.get("/v1/stats")
    async def stats(self):
        lat = sorted(self.latencies)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa: E731
        stages = {s.name: await t.stats.remote() for s, t in self.model_links}
        return {"in_flight": self.in_flight, "receiving": self.gate.receiving, "requests": len(lat),
                "p50_s": pct(0.5), "p99_s": pct(0.99), "refused": dict(self.refused), "stages": stages,
                **stages[self.probe_name]}  # fmt: skip

    @app.get("/")
    def page(self):
        return HTMLResponse((STATIC / "index.html").read_text())
