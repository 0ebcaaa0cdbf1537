"""The HTTP/JSON transport of the ExplainService API, and the web page (aiohttp).

Every answer is the gRPC answer in protobuf's JSON mapping (field names as in the proto, enums by
name, bytes in base64, 64-bit integers as strings), so one client model serves both transports:

    POST /v1/models/{model}:explain                      an image: the raw bytes (Content-Type
    POST /v1/models/{model}/versions/{version}:explain   image/*, ?options=<ExplainOptions JSON>), or
                                                         JSON {"image": "<base64>", "options": {...}},
                                                         or a form with an "image" file (and "options")
    GET  /v1/models                                      ListModelsResponse
    GET  /v1/models/{model}[?version=N]                  GetModelInfoResponse
    GET  /v1/models/{model}/classes[?with_concepts_only=true]             ListClassesResponse
    GET  /v1/models/{model}/classes/{id or name}[?prototypes=N&format=jpeg]  GetClassConceptsResponse
    POST /v1/admin/reload                                ReloadModelsResponse
    GET  /healthz                                        200 when serving, else 503
    GET  /, /static/...                                  the page (service/static/)

Errors go through the same mapping as gRPC's (service/errors.py) and answer
``{"error": {"code": "NOT_FOUND", "message": "..."}}`` with the matching HTTP status; never a
traceback. With a bearer token configured, every route but /healthz, the page and the inference
protocol's health checks needs ``Authorization: Bearer TOKEN`` (an unknown path too: 401). An ``X-Request-Timeout-S`` header
(or ``?timeout_s=``) gives an Explain call a deadline.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from pathlib import Path

import grpc
from aiohttp import web
from google.protobuf import json_format

from ..v1 import explain_service_pb2 as pb
from .errors import HTTP_STATUS, InvalidInputError, status_for

try:
    from . import oip
except ImportError:  # the inference protocol is optional
    oip = None

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
OFFLOAD_BYTES = 256 << 10  # answers larger than this are converted to JSON off the event loop
# routes open without the token (decided by the route a request matched, not by its path): the
# health check, the page and its files, and the inference protocol's probes (service/oip.py)
PUBLIC_ROUTES = frozenset({"Health", "Page", "static", "ServerLive", "ServerReady"})
_CODE_FOR_HTTP: dict[int, grpc.StatusCode] = {405: grpc.StatusCode.UNIMPLEMENTED,
                                              413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              415: grpc.StatusCode.INVALID_ARGUMENT}
for _code, _status in HTTP_STATUS.items():  # the first code of each status: 400 is INVALID_ARGUMENT
    _CODE_FOR_HTTP.setdefault(_status, _code)
PROTOTYPE_FORMATS = {"jpeg": pb.PROTOTYPE_FORMAT_JPEG, "reference": pb.PROTOTYPE_FORMAT_REFERENCE}


class UnauthenticatedError(Exception):
    """No or a wrong bearer token."""


def to_json(msg) -> dict:
    """A message in protobuf's JSON mapping, proto field names, fields at their defaults included."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _json_response(obj, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(obj, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def _message_response(msg) -> web.Response:
    return _json_response(to_json(msg))


def error_response(code: grpc.StatusCode, message: str, status: int | None = None) -> web.Response:
    resp = _json_response({"error": {"code": code.name, "message": message}},
                          status or HTTP_STATUS.get(code, 500))
    if code == grpc.StatusCode.UNAUTHENTICATED:
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


# -- request parsing ---------------------------------------------------------------------------
def _int(query, name: str, default: int | None = 0) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"{name} must be an integer, got {value!r}") from None


def _bool(query, name: str) -> bool:
    value = query.get(name, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise InvalidInputError(f"{name} must be true or false, got {value!r}")


def _version(request: web.Request) -> int:
    if "version" in request.match_info:
        return int(request.match_info["version"])  # the route's pattern is digits
    return _int(request.query, "version")


def _options(value, where: str) -> pb.ExplainOptions:
    """ExplainOptions from its JSON mapping (a dict, or JSON text)."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidInputError(f"{where} is not valid JSON: {e}") from None
    if value is None:
        return pb.ExplainOptions()
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} must be a JSON object (ExplainOptions), got {type(value).__name__}")
    try:
        return json_format.ParseDict(value, pb.ExplainOptions())
    except json_format.ParseError as e:
        raise InvalidInputError(f"{where}: {e}") from None


def _base64(text) -> bytes:
    """Standard or URL-safe base64, padded or not (as protobuf's JSON mapping accepts)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"image must be a base64 string, got {type(text).__name__}")
    text = text.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"image is not valid base64: {e}") from None


def _timeout(request: web.Request) -> float | None:
    value = request.headers.get("X-Request-Timeout-S") or request.query.get("timeout_s")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise InvalidInputError(f"the request timeout must be a positive number of seconds, got {value!r}")
    return seconds


async def _explain_input(request: web.Request) -> tuple[bytes, pb.ExplainOptions]:
    """The image and options of an explain request, from any of its three body forms."""
    query_options = request.query.get("options")
    ctype = request.content_type
    if ctype == "application/json":
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            raise InvalidInputError(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InvalidInputError("the JSON body must be an object {\"image\": \"<base64>\", \"options\": {...}}")
        unknown = sorted(set(body) - {"image", "options"})
        if unknown:
            raise InvalidInputError(f"unknown field(s) {', '.join(map(repr, unknown))} in the body; "
                                    f"expected \"image\" and \"options\"")
        if "image" not in body:
            raise InvalidInputError("the JSON body has no \"image\" (base64 of the image file)")
        if "options" in body and query_options is not None:
            raise InvalidInputError("options are given twice: in the body and in the query string")
        image = _base64(body["image"])
        options = _options(body["options"], "options") if "options" in body else None
    elif ctype == "multipart/form-data":
        form = await request.post()
        field = form.get("image")
        if field is None:
            raise InvalidInputError("the form has no \"image\" field")
        image = field.file.read() if hasattr(field, "file") else str(field).encode()
        options = _options(form["options"], "the form's options") if "options" in form else None
    else:  # the image itself, whatever it claims to be: the decoder decides
        image = await request.read()
        options = None
    if options is None:
        options = _options(query_options, "the options query parameter")
    return image, options


# -- handlers ----------------------------------------------------------------------------------
class HttpApi:
    def __init__(self, server):
        self.server = server

    async def explain(self, request: web.Request) -> web.Response:
        timeout = _timeout(request)
        image, options = await _explain_input(request)
        limit = self.server.config.max_message_bytes
        if len(image) > limit:  # the image is held to the gRPC message limit, whatever the body's form
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(image))
        req = pb.ExplainRequest(image=image, options=options, model=request.match_info["model"],
                                version=_version(request))
        deadline = None if timeout is None else time.monotonic() + timeout
        call = self.server.explain_bytes(req, deadline)
        body = await (call if timeout is None else asyncio.wait_for(call, timeout))
        if len(body) > OFFLOAD_BYTES:  # heatmaps and crops: parse and encode off the event loop
            payload = await asyncio.get_running_loop().run_in_executor(None, _answer_json, body)
        else:
            payload = _answer_json(body)
        return web.Response(body=payload, content_type="application/json")

    async def list_models(self, request: web.Request) -> web.Response:
        return _message_response(self.server.list_models())

    async def model_info(self, request: web.Request) -> web.Response:
        mv = self.server.resolve(request.match_info["model"], _version(request))
        info = mv.model.model_info
        if not info.model:  # the loaded model's name and version in the repository
            info = pb.GetModelInfoResponse()
            info.CopyFrom(mv.model.model_info)
            info.model, info.version = mv.name, mv.version
        return _message_response(info)

    async def list_classes(self, request: web.Request) -> web.Response:
        mv = self.server.resolve(request.match_info["model"], _version(request))
        body = mv.model.list_classes(_bool(request.query, "with_concepts_only"))
        return _message_response(pb.ListClassesResponse.FromString(body))

    async def class_concepts(self, request: web.Request) -> web.Response:
        key = request.match_info["class"]
        ref = pb.ClassRef(id=int(key)) if key.isascii() and key.isdigit() else pb.ClassRef(name=key)
        fmt = request.query.get("format", "reference").strip().lower()
        fmt = PROTOTYPE_FORMATS.get(fmt.removeprefix("prototype_format_"))
        if fmt is None:
            raise InvalidInputError(f"format must be jpeg or reference, got {request.query['format']!r}")
        req = pb.GetClassConceptsRequest(class_ref=ref, model=request.match_info["model"],
                                         version=_version(request), prototype_format=fmt)
        n = _int(request.query, "prototypes", None)
        if n is not None:
            req.prototypes_per_concept = n
        return _message_response(await self.server.class_concepts(req))

    async def reload(self, request: web.Request) -> web.Response:
        return _message_response(await self.server.reload())

    async def healthz(self, request: web.Request) -> web.Response:
        ready = self.server.ready()
        return _json_response({"status": "SERVING" if ready else "NOT_SERVING"}, 200 if ready else 503)

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")


def _answer_json(body: bytes) -> bytes:
    return json.dumps(to_json(pb.ExplainResponse.FromString(body)), separators=(",", ":")).encode()


# -- errors, auth, metrics: one middleware -----------------------------------------------------
def _middleware(server, token: str | None):
    expected = f"Bearer {token}".encode() if token else None
    record = server.metrics.rpc

    @web.middleware
    async def middleware(request: web.Request, handler):
        name = getattr(request.match_info.route, "name", None)  # None: no route matched
        public = name in PUBLIC_ROUTES
        method = f"HTTP {name.split('-')[0]}" if name and not public else None
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            if expected is not None and not public:
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    raise UnauthenticatedError()
            resp = await handler(request)
            if resp.status >= 400:  # an error answered by the handler itself (the inference protocol's)
                code = _CODE_FOR_HTTP.get(resp.status, grpc.StatusCode.UNKNOWN)
            return resp
        except UnauthenticatedError:
            code = grpc.StatusCode.UNAUTHENTICATED
            return error_response(code, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'")
        except web.HTTPException as e:  # aiohttp's own: no such route, wrong method, body too large
            if e.status < 400:
                raise
            code = _CODE_FOR_HTTP.get(e.status, grpc.StatusCode.UNKNOWN)
            message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
            if e.status == 404:
                message = f"no such resource: {request.method} {request.path}"
            elif e.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
            resp = error_response(code, message, e.status)
            if e.status == 405 and "Allow" in e.headers:
                resp.headers["Allow"] = e.headers["Allow"]
            return resp
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:  # typed serving errors and anything else: never a traceback
            code, message = status_for(e)
            return error_response(code, message)
        finally:
            if method is not None:
                record(method, code.name, time.perf_counter() - start)

    return middleware


# -- the application ---------------------------------------------------------------------------
def build_app(server) -> web.Application:
    """The aiohttp application of ``server`` (an ExplainServer): the API, the page and, when
    service/oip.py is there, the inference protocol."""
    cfg = server.config
    # base64 in a JSON body is 4/3 of the image; the image itself is held to the gRPC limit
    limit = cfg.max_message_bytes * 4 // 3 + (64 << 10)
    app = web.Application(client_max_size=limit, middlewares=[_middleware(server, cfg.token())])
    api = HttpApi(server)
    model, version = r"{model:[^/:]+}", r"{version:\d+}"
    r = app.router
    # route names are unique: "Explain-version" is counted as "HTTP Explain"
    r.add_post(f"/v1/models/{model}:explain", api.explain, name="Explain")
    r.add_post(f"/v1/models/{model}/versions/{version}:explain", api.explain, name="Explain-version")
    r.add_get("/v1/models", api.list_models, name="ListModels")
    r.add_get(f"/v1/models/{model}", api.model_info, name="GetModelInfo")
    r.add_get(f"/v1/models/{model}/versions/{version}", api.model_info, name="GetModelInfo-version")
    r.add_get(f"/v1/models/{model}/classes", api.list_classes, name="ListClasses")
    r.add_get(f"/v1/models/{model}/classes/{{class}}", api.class_concepts, name="GetClassConcepts")
    r.add_post("/v1/admin/reload", api.reload, name="ReloadModels")
    r.add_get("/healthz", api.healthz, name="Health")
    r.add_get("/", api.page, name="Page")
    r.add_static("/static", STATIC_DIR, show_index=False, follow_symlinks=False, name="static")
    if oip is not None and hasattr(oip, "add_routes"):
        oip.add_routes(app, server)
    return app


def _ssl_context(cfg):
    """HTTPS with the gRPC port's certificate (and client certificates with --tls-client-ca), or None."""
    if not cfg.tls_cert:
        return None
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_client_ca:
        ctx.load_verify_locations(cfg.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_http(server, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``build_app(server)`` on host:port (0: a free port); returns the runner (``await
    runner.cleanup()`` stops it) and the bound port."""
    runner = web.AppRunner(build_app(server), access_log=None, shutdown_timeout=server.config.grace_s)
    await runner.setup()
    host = host.strip("[]") or None  # "[::]" as gRPC spells it
    site = web.TCPSite(runner, host, port, ssl_context=_ssl_context(server.config))
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    log.debug("HTTP API and page on %s:%d", host or "*", bound)
    return runner, bound
