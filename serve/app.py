"""The online endpoint: a FastAPI ingress and one deployment per model stage, composed with handles.

    POST /v1/upscale   image as the raw body or multipart field `image`; parameters as query/form fields
    GET  /v1/models    presets, envelopes, defaults          GET /healthz   200 only once the model is loaded
    GET  /v1/stats     batch sizes seen by the diffuse deployment, in-flight requests
    GET  /             a page to try it

The stage classes are the ones the batch job runs. Decode happens in the ingress so bad input is
answered at once: 400 (not an image / corrupt), 413 (too many pixels or bytes), 422 (bad
parameters), 401 (missing/wrong bearer token when one is configured), 503 + Retry-After (queue
full), 504 (timeout). Internal errors are 500 with a short message, never a stack trace.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress wrapper.

import asyncio
import hmac
import os
import time
import uuid
from collections import Counter, deque
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.imageio import TooLarge
from pipeline.model.presets import PRESETS, get_preset
from pipeline.stages import DecodeStage, DiffuseStage, EncodeStage, MergeStage, UpscaleOptions, failed, is_failed
from pipeline.tiling import TilePlan
from serve.metrics import ServeMetrics

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_ENV = "PIDRAY_API_TOKEN"
ROW_PARAMS = {"seed": int, "caption": str, "degrade_sigma": float, "format": str, "scale": float, "steps": int,
              "quality": int}  # fmt: skip


# ---------------------------------------------------------------------------------------------- stage deployments
@serve.deployment(name="encode")
class EncodeDeployment:
    def __init__(self, model: dict, options: dict):
        self.stage = EncodeStage(model, options)

    def __call__(self, row: dict) -> dict:
        return self.stage(row)


TILE_COST_CAP = 8  # a request counts as at most this many tiles, so one big image still forms a batch of its own


def batch_cost(rows: list[dict]) -> int:
    return sum(min(TilePlan.from_dict(r["plan"]).n_tiles if "plan" in r else 1, TILE_COST_CAP) for r in rows)


@serve.deployment(name="diffuse")
class DiffuseDeployment:
    """Holds the model once per replica; requests are batched by tile count, grouped by tile shape and steps."""

    def __init__(
        self, model: dict, options: dict, max_batch_tiles: int = 16, batch_wait_s: float = 0.005, threads: int = 0
    ):
        import torch
        from ray.serve import metrics

        if threads:  # a CPU replica: Ray pins OMP_NUM_THREADS to its (fractional) CPU share
            torch.set_num_threads(threads)
        if max_batch_tiles < TILE_COST_CAP:
            raise ValueError(f"max_batch_tiles must be >= {TILE_COST_CAP}, got {max_batch_tiles}")
        self.stage = DiffuseStage(model, options)
        self.batch_sizes: Counter = Counter()
        self.batch_metric = metrics.Histogram(
            "pidray_diffuse_batch_size", "requests per diffuse batch", boundaries=[1, 2, 4, 8, 16, 32]
        )
        self.run.set_max_batch_size(max_batch_tiles)
        self.run.set_batch_wait_timeout_s(batch_wait_s)

    def ready(self) -> bool:
        return True

    def stats(self) -> dict:
        return {"batch_sizes": dict(self.batch_sizes), "device": str(self.stage.device)}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=batch_cost)
    async def run(self, rows: list[dict]) -> list[dict]:
        self.batch_sizes[len(rows)] += 1
        self.batch_metric.observe(len(rows))
        return await asyncio.to_thread(self._run_sync, rows)

    def _run_sync(self, rows: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(rows)
        groups: dict[tuple, list[tuple[int, tuple]]] = {}
        for i, row in enumerate(rows):
            if is_failed(row):
                out[i] = row
                continue
            item, steps = self.stage.request(row)
            groups.setdefault((item[2].tile, steps), []).append((i, item))
        for (_, steps), members in groups.items():
            idx = [i for i, _ in members]
            t0 = time.perf_counter()
            try:
                results = self.stage.diffuse_many([item for _, item in members], steps=steps)
            except ValueError as e:
                for i in idx:
                    out[i] = failed(rows[i], "diffuse", e)
                continue
            dt = round(time.perf_counter() - t0, 4)
            for i, tiles in zip(idx, results):
                r = {k: v for k, v in rows[i].items() if k not in ("latent", "caption_emb")}
                r["tiles"] = tiles.numpy()
                r.setdefault("timings", {})["diffuse"] = dt
                r["batch"] = len(rows)
                out[i] = r
        return out

    async def __call__(self, row: dict) -> dict:
        return await self.run(row)


@serve.deployment(name="merge")
class MergeDeployment:
    def __init__(self, options: dict):
        self.stage = MergeStage(options)

    def __call__(self, row: dict) -> dict:
        return self.stage(row)


# ---------------------------------------------------------------------------------------------- ingress
app = FastAPI(title="pidray", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        encode: DeploymentHandle,
        diffuse: DeploymentHandle,
        merge: DeploymentHandle,
        settings: dict,
    ):
        # A stage handle may be None: the stage holds no model (StageGraph.holds_model), so it runs right here in
        # the ingress replica instead of costing a hop (the RGB encode of the small preset, the merge).
        self.encode, self.diffuse, self.merge = encode, diffuse, merge
        self.local_encode = EncodeStage(settings["model"], settings.get("options", {})) if encode is None else None
        self.local_merge = MergeStage(settings.get("options", {})) if merge is None else None
        self.preset = get_preset(settings["preset"])
        self.options = UpscaleOptions.from_dict(settings.get("options", {}))
        self.max_bytes = int(settings.get("max_bytes", 50 << 20))
        self.timeout_s = float(settings.get("timeout_s", 120.0))
        self.token = settings.get("token") or os.environ.get(TOKEN_ENV) or None
        self.output_s3 = settings.get("output_s3")  # {"uri": "s3://bucket/prefix", "endpoint_url": ...}
        self.decoder = DecodeStage(self.options.max_pixels)
        self.in_flight = 0
        self.latencies: deque = deque(maxlen=2048)
        self.metrics = ServeMetrics()

    # -------------------------------------------------------------------------------- helpers
    def _authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        got = request.headers.get("authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.token.encode())

    async def _read_image(self, request: Request) -> tuple[bytes, dict]:
        ctype = request.headers.get("content-type", "")
        length = int(request.headers.get("content-length") or 0)
        if length > self.max_bytes:
            raise TooLarge(f"request body is {length:,} bytes, over the limit of {self.max_bytes:,}")
        fields: dict = {}
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ValueError("multipart request needs a file field named 'image'")
            data = await upload.read()
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
        else:
            data = await request.body()
        if len(data) > self.max_bytes:
            raise TooLarge(f"image is {len(data):,} bytes, over the limit of {self.max_bytes:,}")
        return data, fields

    def _row_params(self, params: dict) -> dict:
        unknown = sorted(set(params) - set(ROW_PARAMS) - {"preset", "store"})
        if unknown:
            raise ValueError(f"unknown parameter(s): {unknown}")
        if params.get("preset") and get_preset(params["preset"]).name != self.preset.name:
            raise ValueError(f"this endpoint serves preset {self.preset.name!r}, not {params['preset']!r}")
        row = {}
        for name, kind in ROW_PARAMS.items():
            if params.get(name) not in (None, ""):
                try:
                    row[name] = kind(params[name])
                except ValueError:
                    raise ValueError(f"{name} must be {kind.__name__}, got {params[name]!r}") from None
        # validate against the same rules as the job
        probe = {k: row[k] for k in ("steps", "degrade_sigma", "scale", "quality") if k in row}
        UpscaleOptions(**{**self.options.to_dict(), **probe})
        if "format" in row:
            from pipeline.imageio import output_format

            output_format(None, row["format"])
        return row

    async def _pipeline(self, row: dict) -> dict:
        if self.encode is None:
            row = await asyncio.to_thread(self.local_encode, row)
        else:
            row = await self.encode.remote(row)
        if row.get("status") == "failed":
            return row
        row = await self.diffuse.remote(row)
        if row.get("status") == "failed":
            return row
        if self.merge is None:
            return await asyncio.to_thread(self.local_merge, row)
        return await self.merge.remote(row)

    # -------------------------------------------------------------------------------- routes
    @app.post("/v1/upscale")
    async def upscale(self, request: Request):
        t0 = time.perf_counter()
        status = 500
        self.in_flight += 1
        self.metrics.queue(self.in_flight)
        try:
            resp = await self._upscale(request)
            status = resp.status_code
            return resp
        finally:
            self.in_flight -= 1
            dt = time.perf_counter() - t0
            self.latencies.append(dt)
            self.metrics.request(status, dt)
            self.metrics.queue(self.in_flight)

    async def _upscale(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
        try:
            data, fields = await self._read_image(request)
            params = {**dict(request.query_params), **fields}
            row = {"key": "request", "bytes": data, **self._row_params(params)}
        except TooLarge as e:
            return _error(413, str(e))
        except ValueError as e:
            return _error(422, str(e))
        row = self.decoder(row)
        if row.get("status") == "failed":
            return _error(413 if "over the limit" in row["error"] else 400, row["error"])
        try:
            row = await asyncio.wait_for(self._pipeline(row), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            return _error(504, f"upscale did not finish within {self.timeout_s:.0f}s")
        except Exception as e:  # a replica died or similar: short message, no trace
            return _error(500, f"internal error: {type(e).__name__}")
        if row.get("status") != "ok":
            err = row.get("error", "failed")
            return _error(413 if "over the limit" in err else 422 if err.startswith("encode") else 400, err)
        headers = {
            "X-Pidray-Seed": str(row.get("seed", self.options.seed)),
            "X-Pidray-Size": f"{row['out_hw'][1]}x{row['out_hw'][0]}",
            "X-Pidray-Timings": ",".join(f"{k}={v:.3f}" for k, v in row.get("timings", {}).items()),
            "X-Pidray-Batch": str(row.get("batch", 1)),
        }
        if row.get("notes"):
            headers["X-Pidray-Notes"] = "; ".join(row["notes"])[:500].encode("ascii", "replace").decode()
        if request.query_params.get("store") == "s3":
            return await self._store(row, headers)
        return Response(row["output"], media_type=row["content_type"], headers=headers)

    async def _store(self, row: dict, headers: dict) -> Response:
        if not self.output_s3:
            return _error(422, "store=s3 is not configured on this endpoint")
        from jobs.storage import Location, S3Settings

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
            "presets": {n: {"scale": q.scale, "envelope": q.envelope, "variant": q.variant, "vae": q.vae,
                            "served": n == p.name} for n, q in PRESETS.items()},
        }  # fmt: skip

    @app.get("/healthz")
    async def healthz(self):
        try:
            await asyncio.wait_for(self.diffuse.ready.remote(), timeout=5)
        except Exception:
            return _error(503, "model not loaded yet")
        return {"status": "ok", "preset": self.preset.name}

    @app.get("/v1/stats")
    async def stats(self):
        lat = sorted(self.latencies)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa: E731
        diffuse = await self.diffuse.stats.remote()
        return {"in_flight": self.in_flight, "requests": len(lat), "p50_s": pct(0.5), "p99_s": pct(0.99), **diffuse}

    @app.get("/")
    def page(self):
        return HTMLResponse((STATIC / "index.html").read_text())


def deployment_names(preset: str) -> list[str]:
    """The deployments `build_app` creates for a preset: model-holding stages only, plus the ingress."""
    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions

    graph = StageGraph(ModelOptions(preset=preset))
    return ["ingress"] + [s.name for s in graph.stages if s.holds_model]


def build_app(args: dict | None = None):
    """Serve application builder (`serve run serve.app:build_app preset=small`)."""
    args = dict(args or {})
    preset = args.get("preset", "small")
    model = {"preset": preset, "weights": args.get("weights"), "text_encoder": args.get("text_encoder"),
             "allow_download": bool(args.get("allow_download", False)), "device": args.get("device", "auto"),
             "dtype": args.get("dtype", "auto")}  # fmt: skip
    options = UpscaleOptions.from_dict(args.get("options", {})).to_dict()
    settings = {"preset": preset, "options": options, **{k: args[k] for k in
                ("max_bytes", "timeout_s", "token", "output_s3") if k in args}}  # fmt: skip
    diffuse_opts = {k: args[k] for k in ("max_batch_tiles", "batch_wait_s", "threads") if k in args}
    dep = {**DEFAULT_DEPLOYMENTS, **args.get("deployments", {})}
    if args.get("gpu", _has_gpu()):
        dep["diffuse"] = {**dep["diffuse"], "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}
    else:
        diffuse_opts.setdefault("threads", os.cpu_count() or 1)
    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions

    graph = StageGraph(ModelOptions(**model), UpscaleOptions.from_dict(options))
    settings["model"] = model
    # Stages that hold a model are deployments of their own; the others run inside the ingress replicas.
    encode = EncodeDeployment.options(**dep["encode"]).bind(model, options) if graph["encode"].holds_model else None
    diffuse = DiffuseDeployment.options(**dep["diffuse"]).bind(model, options, **diffuse_opts)
    merge = MergeDeployment.options(**dep["merge"]).bind(options) if graph["merge"].holds_model else None
    return Ingress.options(**dep["ingress"]).bind(encode, diffuse, merge, settings)


# Local defaults; serve/config.yaml carries the same for `serve deploy`, with autoscaling.
# Fractional CPUs so the whole app fits a laptop-sized local cluster.
DEFAULT_DEPLOYMENTS = {
    "ingress": {"max_ongoing_requests": 16, "max_queued_requests": 16, "ray_actor_options": {"num_cpus": 0.1},
                "backpressure_config": {"status_code": 503, "retry_after_s": 2}},
    "encode": {"max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 0.1}},
    "diffuse": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.5}},
    "merge": {"max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 0.1}},
}  # fmt: skip


def _has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
