"""Blob routes: streamed upload and download, sha256-addressed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from orchestrator.api.deps import AnyPrincipalDep, ServicesDep
from orchestrator.api.openapi import problems
from orchestrator.api.strict_json import StrictJSONRoute
from protocol.units import SHA256_PATTERN

router = APIRouter(prefix="/v1/blobs", tags=["blobs"], route_class=StrictJSONRoute)

BINARY = {"type": "string", "format": "binary"}
Sha256Path = Annotated[str, Path(pattern=SHA256_PATTERN, description="lower-case hex sha256")]


class BlobInfo(BaseModel):
    sha256: str
    size: int


@router.post(
    "",
    status_code=201,
    responses=problems(401, 413, 422, 507),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": BINARY}},
        }
    },
)
async def upload_blob(
    request: Request,
    principal: AnyPrincipalDep,
    services: ServicesDep,
    content_length: Annotated[int | None, Header(ge=0)] = None,
    x_content_sha256: Annotated[str | None, Header(pattern=SHA256_PATTERN)] = None,
) -> BlobInfo:
    """Upload raw bytes (streamed to disk, never held whole in memory). Returns the sha256
    address to use as ``input_blob``. Optional ``X-Content-SHA256`` is checked."""
    sha256, size = await services.blobs.upload(
        principal,
        request.stream(),
        services.now(),
        content_length=content_length,
        expected_sha256=x_content_sha256,
    )
    return BlobInfo(sha256=sha256, size=size)


@router.get(
    "/{sha256}",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The blob's bytes",
            "content": {"application/octet-stream": {"schema": BINARY}},
        },
        **problems(401, 404, 422),
    },
)
def download_blob(
    sha256: Sha256Path, principal: AnyPrincipalDep, services: ServicesDep
) -> FileResponse:
    """Stream a blob you uploaded, a result of one of your jobs, or (workers) a leased input."""
    path, _size = services.blobs.readable_path(principal, sha256)
    return FileResponse(
        path, media_type="application/octet-stream", headers={"ETag": f'"{sha256}"'}
    )
