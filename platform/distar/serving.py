"""The generator behind HTTP: a Ray Serve app that answers `POST /generate` with PNGs.

    serve run distar.serving:app model=models:/distar-generator@champion [tracking_uri=URI] \
        [num_replicas=1] [num_cpus=1] [num_gpus=0] [max_batch_size=8] [batch_wait_timeout_s=0.01] \
        [max_queued_requests=64] [request_timeout_s=30]
    serve run cluster_configs/serve.yaml          # the same as a Serve config file

`app(args)` is the application builder both forms call. `model` is any location
`distar.tracking.registry.load` opens (`models:/name@alias`, `models:/name/N`, `runs:/...`, an
MLflow model folder, a diffusers folder). An alias is resolved to its version once, where the app
is built, so every replica serves that pinned version even if the alias moves later. `tracking_uri`
defaults to MLFLOW_TRACKING_URI of the process that builds the app (with `serve run CONFIG` that
is a task on the cluster: set it in the config's args), else the embedded store of its directory.
The store's credentials (from the URI or MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN where the app is
built) travel to the replicas inside the deployment's arguments, never printed or shown.

Each replica loads the model once. Requests:

    POST /generate  {"prompt": str (1..1000 characters), "seed": 0..2**32-1 (optional, random if
                     absent), "num_images": 1..max_batch_size (default 1)}, Content-Type application/json
        200 image/png (one image; headers X-Seed, X-Batch-Size), or
        200 application/json {"images": [base64 PNG, ...], "seeds": [...]} for num_images > 1.
        Image i uses noise seed seed+i: the same request always gives the same images, the same
        ones `jobs/generate.py` and the pyfunc model make.
        4xx {"error": "<field>: <reason>"}: 415 not JSON, 413 body over 16 KiB, 400 unparsable
        JSON or not an object, 422 a field missing, unknown, of the wrong type or out of range,
        408 a body not received within request_timeout_s, 429 (Retry-After) when the replica
        already holds max_queued_requests generate requests. A rejected request never reaches
        the model.
    GET /healthz    {"status": "ok", "model": URI, "name": registered name, "version": N}

Concurrent requests are batched (`serve.batch`, counted in images up to `max_batch_size`) into
one generator call; it runs in a thread so health checks and validation go on meanwhile. A
replica takes more requests than it holds generate requests (max_ongoing_requests), so slow or
waiting generate requests never keep /healthz or a 429 out.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself in the methods
# serve.ingress rewrites, whose string annotations it could not resolve.
import asyncio
import base64
import json
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from distar.errors import UserError
from distar.tracking import store

MAX_PROMPT_CHARS = 1000
MAX_BODY_BYTES = 16 * 1024  # a 1000-character prompt fits even fully \u-escaped
MAX_SEED = 2**32 - 1
HEADROOM = 32  # requests a replica takes beyond the generate requests it holds: health checks, refusals


class ServeArgsError(UserError, ValueError):
    """Bad application arguments; the message names the argument."""

    kind = "serve args"


class ServeArgs(BaseModel):
    """The arguments of `serve run distar.serving:app KEY=VALUE ...` (or a config's `args`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    tracking_uri: str | None = None
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_batch_size: int = Field(default=8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, le=10)
    max_queued_requests: int = Field(default=64, ge=1, le=10_000)
    request_timeout_s: float = Field(default=30.0, gt=0, le=3600)


class GenerateRequest(BaseModel):
    """The body of POST /generate. Strict: "5" is not a seed, true is not a number of images."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_images: int = Field(default=1, ge=1)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("num_images")
    @classmethod
    def _within_batch(cls, value: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_images")
        if limit is not None and value > limit:
            raise ValueError(f"at most {limit} per request (the server's max_batch_size)")
        return value


def _describe(error: ValidationError) -> str:
    """Pydantic errors as 'field: reason; ...', never echoing the (possibly huge) input."""
    parts = []
    for e in error.errors(include_input=False, include_url=False):
        field = ".".join(str(x) for x in e["loc"])[:100] or "body"
        parts.append(f"{field}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _images_in(jobs: list[tuple[str, int, int]]) -> int:
    """serve.batch sizes a batch in images: a request asks for num_images of them."""
    return sum(n for _, _, n in jobs)


api = FastAPI(title="distar generator", docs_url=None, redoc_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (404, 405) in the same {"error": reason} form as validation errors."""
    return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code, headers=exc.headers)


# serve.deployment pickles the class when it is defined: whatever its methods use must be above it.
@serve.deployment(graceful_shutdown_timeout_s=5, max_constructor_retry_count=3)
@serve.ingress(api)
class Endpoint:
    """One replica: the model loaded once, requests validated, then batched into the model."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        from distar.tracking import registry

        torch.set_num_threads(max(1, int(spec["num_cpus"])))
        loaded = registry.load(spec["model"], spec["store"])  # once per replica, with the store's credentials
        if spec["num_gpus"] > 0 and torch.cuda.is_available():
            loaded.model.pipe.to("cuda")
        self.model, self.max_images = loaded.model, int(spec["max_batch_size"])
        self.max_queued, self.timeout_s, self.holding = int(spec["max_queued_requests"]), float(spec["request_timeout_s"]), 0
        self.health = {"status": "ok", "model": store.redact(loaded.uri), "name": loaded.name,
                       "version": int(loaded.version) if loaded.version else None, "max_batch_size": self.max_images}
        self._batch.set_max_batch_size(self.max_images)
        self._batch.set_batch_wait_timeout_s(float(spec["batch_wait_timeout_s"]))
        # serve.batch forms the next batch while the current one computes, from whatever arrived
        # in batch_wait_timeout_s; requests that come later would wait for the batch after it. So
        # requests queue here while the model is busy and join the batch formed when it is free.
        self._model_free = asyncio.Event()
        self._model_free.set()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return self.health

    @api.post("/generate")
    async def generate(self, request: Request) -> Response:
        if self.holding >= self.max_queued:  # before reading anything: a full replica answers at once
            return JSONResponse({"error": f"busy: {self.holding} requests queued; retry later"}, status_code=429, headers={"Retry-After": "1"})
        self.holding += 1
        try:
            return await self._generate(request)
        finally:
            self.holding -= 1

    async def _generate(self, request: Request) -> Response:
        try:
            body = await asyncio.wait_for(self._json_body(request), self.timeout_s)  # a trickling body does not hold a slot
            job = GenerateRequest.model_validate(body, context={"max_images": self.max_images})
        except TimeoutError:
            return JSONResponse({"error": f"body: not received within {self.timeout_s:g} s"}, status_code=408)
        except BadRequest as e:
            return JSONResponse({"error": e.reason}, status_code=e.status)
        except ValidationError as e:
            return JSONResponse({"error": _describe(e)}, status_code=422)
        seed = job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 2 - job.num_images)
        await self._model_free.wait()
        pngs, batch = await self._batch((job.prompt, seed, job.num_images))
        headers = {"X-Seed": str(seed), "X-Batch-Size": str(batch)}
        if job.num_images == 1:
            return Response(pngs[0], media_type="image/png", headers=headers)
        body = {"images": [base64.b64encode(p).decode("ascii") for p in pngs], "seeds": list(range(seed, seed + job.num_images))}
        return JSONResponse(body, headers=headers)

    @staticmethod
    async def _json_body(request: Request) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise BadRequest(415, f"content-type: expected application/json, got {kind[:60]!r}")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BadRequest(413, f"body: {int(declared)} bytes, the limit is {MAX_BODY_BYTES}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise BadRequest(413, f"body: over the limit of {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(bytes(body))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise BadRequest(400, f"body: not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
        if not isinstance(data, dict):
            raise BadRequest(400, f"body: expected a JSON object, got {type(data).__name__}")
        return data

    @serve.batch(batch_size_fn=_images_in)
    async def _batch(self, jobs: list[tuple[str, int, int]]) -> list[tuple[list[bytes], int]]:
        self._model_free.clear()
        try:
            return await asyncio.to_thread(self._run, jobs)
        finally:
            self._model_free.set()

    def _run(self, jobs: list[tuple[str, int, int]]) -> list[tuple[list[bytes], int]]:
        from distar.images import to_uint8
        from distar.tracking.registry import expand, png

        prompts, seeds = expand([p for p, _, _ in jobs], [s for _, s, _ in jobs], [n for _, _, n in jobs])
        images = [png(x) for x in to_uint8(self.model.generate(prompts, seeds))]
        out, start = [], 0
        for _, _, n in jobs:
            out.append((images[start : start + n], len(images)))
            start += n
        return out


def _pinned(model: str, where: store.Store) -> str:
    """A registry alias resolved to its version now; a local folder made absolute (replicas run
    in other directories); other URIs unchanged."""
    if model.startswith("models:/"):
        from distar.tracking import registry

        try:
            store.connect(where)  # a server that does not answer fails in seconds, not MLflow's minutes of retries
        except UserError as e:
            raise ServeArgsError(f"tracking_uri: {e.message.split(': ', 1)[-1]}") from None
        try:
            name, version = registry.resolve_version(model, where)
        except UserError as e:
            raise ServeArgsError(f"model: {e.message}") from None
        return f"models:/{name}/{version}"
    if "://" in model or model.startswith("runs:/"):
        return model
    folder = Path(model).expanduser().resolve()
    if not folder.is_dir():
        raise ServeArgsError(f"model: {model} is neither a folder nor a models:/ or runs:/ URI")
    return str(folder)


def app(args: dict) -> Application:
    """The application builder: `serve run distar.serving:app model=...` and config files call it."""
    try:
        parsed = ServeArgs.model_validate(args or {})
    except ValidationError as e:
        raise ServeArgsError(_describe(e) + " (usage: serve run distar.serving:app model=models:/NAME@ALIAS [key=value ...])") from None
    where = store.resolve(parsed.tracking_uri)
    model = _pinned(parsed.model, where)
    spec = {**parsed.model_dump(exclude={"tracking_uri"}), "model": model, "store": where}  # a Store's repr omits its credentials
    options = {"num_cpus": parsed.num_cpus, "num_gpus": parsed.num_gpus}
    # Room above the generate requests a replica holds: /healthz and 429s always get in.
    ongoing = parsed.max_queued_requests + HEADROOM
    return Endpoint.options(
        num_replicas=parsed.num_replicas, ray_actor_options=options, max_ongoing_requests=ongoing, max_queued_requests=ongoing,
    ).bind(spec)
