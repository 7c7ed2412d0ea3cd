"""Request bodies under a size cap (``VQA_API_MAX_BODY_BYTES``), parsed as JSON.

The cap holds while the body is read: a declared Content-Length over it is refused before a
byte is read, and a chunked body is counted as it arrives, so an endless body costs at most
the cap in memory. Malformed JSON is a 400 problem, never a 500.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from producer.api.problems import Problem


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise Problem(413, f"request body over {limit} bytes", code="body_too_large")
        except ValueError:
            raise Problem(400, "Content-Length is not a number", code="bad_request") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"request body over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise Problem(400, "body is not UTF-8 JSON", code="malformed_json") from None
    except json.JSONDecodeError as exc:
        raise Problem(400, f"body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", code="malformed_json") from None
    except RecursionError:
        raise Problem(400, "body is not JSON (nested too deeply)", code="malformed_json") from None
