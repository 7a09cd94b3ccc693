"""`python -m skinml.serving.mlserver_entry FOLDER`: `mlserver start FOLDER`, with a one-line
400 for a V2 body that is not JSON or not an inference request, and skinml's log lines in
MLServer's format.

FastAPI answers such a body with a 422 whose JSON lists every validation error, each with
the offending input echoed back (kilobytes of base64); MLServer offers no setting for it, so
the handler is added to its REST app here, the one place that reaches into MLServer
(`_rest_server._app`, MLServer 1.7; tests/serving/test_mlserver.py pins the answer).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from mlserver import MLServer
from mlserver.cli.serve import load_settings
from mlserver.logging import configure_logger
from mlserver.logging import logger as mlserver_logger
from mlserver.utils import install_uvloop_event_loop

# Imported before MLflow loads the model (which puts the model's own copy of skinml first on
# the path): the runtime is always this installation's.
import skinml.serving.mlserver_runtime  # noqa: F401

log = logging.getLogger("skinml.serving.mlserver_entry")  # __main__ when run


async def invalid_body(request, exc: RequestValidationError) -> JSONResponse:
    """400 with the first problem of a V2 body, without its values."""
    reason = describe(exc.errors())
    log.warning("refused %s: 400 %s", request.url.path, reason)
    return JSONResponse({"error": reason}, status_code=400)


def describe(errors: Sequence[dict]) -> str:
    """'request body is not valid JSON' or 'request body: inputs.0.shape: Field required'
    (and how many more problems there are)."""
    if not errors:
        return "request body is not a V2 inference request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON{': ' + detail if detail else ''}"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"request body: {where or 'body'}: {first.get('msg', 'invalid')}{more}"


async def serve(folder: str) -> None:
    settings, models = await load_settings(folder)
    server = MLServer(settings)
    skinml_logger = logging.getLogger("skinml")  # MLServer configured its own just now
    skinml_logger.handlers = list(mlserver_logger.handlers)
    skinml_logger.setLevel(logging.INFO)
    skinml_logger.propagate = False
    server._rest_server._app.add_exception_handler(RequestValidationError, invalid_body)
    await server.start(models)


def main(argv: list[str]) -> None:
    """What `mlserver start` does (its logger, uvloop when installed), then `serve`."""
    if len(argv) != 1:
        sys.exit("usage: python -m skinml.serving.mlserver_entry FOLDER")
    configure_logger()
    install_uvloop_event_loop()
    asyncio.run(serve(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
