"""The job routes: ``POST /jobs``, ``GET /jobs``, ``GET /jobs/{id}``, ``GET /jobs/{id}/events`` (the
status as server-sent events, FastAPI's own SSE support), ``POST /jobs/{id}/cancel``,
``DELETE /jobs/{id}`` and ``GET /jobs/{id}/result`` (Starlette's ``FileResponse``: Content-Length,
Range with 206 and 416, If-Range; the ETag is the file's sha256). Each handler only chooses the
representation; ``app.jobs.serving`` does the rest.
"""

# No ``from __future__ import annotations``: FastAPI must see the per-app request model, which is local to
# build_router, as a real object rather than a string it cannot resolve.

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.deps import JobsDep
from app.errors import error_responses
from app.jobs.results import media_type
from app.jobs.schemas import Deleted, JobList, JobRequestBase, JobStatus
from app.jobs.serving import check_range

JobId = Annotated[str, Path(description="the job's id, as POST /jobs answered it")]
ERRORS = error_responses(
    {
        401: "missing or wrong API key (when the server has one)",
        404: "no such job on this replica",
        409: "the job is kept by another replica (job_on_other_replica: retry), or the request does not fit the "
        "job's state (the message says why)",
        503: "the server is starting or shutting down",
    }
)
CREATE_ERRORS = error_responses(
    {
        401: "missing or wrong API key (when the server has one)",
        404: "the model is not served",
        409: "the Idempotency-Key names a job created with another request",
        413: "the job would pass the disk quota (FASHION_JOB_DISK_QUOTA_BYTES)",
        422: "invalid parameters: the message names the field and what it accepts",
        429: "the job queue is full; retry after the Retry-After header's seconds",
        503: "the server is starting or shutting down",
    }
)


def build_router(body_model: type[JobRequestBase]) -> APIRouter:
    """The routes, with this app's request model (its bounds come from the settings)."""
    router = APIRouter(tags=["jobs"])

    @router.post(
        "/jobs",
        status_code=202,
        response_model=JobStatus,
        responses={
            200: {"model": JobStatus, "description": "the job the Idempotency-Key already names"},
            **CREATE_ERRORS,
        },
        summary="Start a job: a labelled dataset drawn in the device's idle time",
    )
    async def create(
        body: body_model,  # type: ignore[valid-type]
        request: Request,
        response: Response,
        jobs: JobsDep,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ) -> JobStatus:
        """Queue a job (202, ``Location``: its status). With ``Idempotency-Key``, a repeat of the same request
        answers 200 with the job that key made, and never makes a second one."""
        status, created = await jobs.create(body, idempotency_key, request)
        response.status_code = 202 if created else 200
        response.headers["Location"] = status.url
        return status

    @router.get("/jobs", response_model=JobList, responses=ERRORS, summary="This replica's jobs, newest first")
    async def list_jobs(
        jobs: JobsDep,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: Annotated[str | None, Query(max_length=64, description="the last id of the previous page")] = None,
    ) -> JobList:
        return await jobs.page(limit, after)

    @router.get("/jobs/{job_id}", response_model=JobStatus, responses=ERRORS, summary="A job's status")
    async def status(job_id: JobId, jobs: JobsDep) -> JobStatus:
        return await jobs.status(job_id)

    async def opened(job_id: JobId, jobs: JobsDep) -> str:
        await jobs.status(job_id)  # a 404 or 409 before the stream starts
        return job_id

    @router.get(
        "/jobs/{job_id}/events",
        response_class=EventSourceResponse,
        responses=ERRORS,
        summary="A job's status as server-sent events",
    )
    async def events(job_id: Annotated[str, Depends(opened)], jobs: JobsDep) -> AsyncIterator[ServerSentEvent]:
        """A ``status`` event now and at every change, until the job has ended (the last event is its end)."""
        async for event in jobs.events(job_id):
            yield event

    @router.post("/jobs/{job_id}/cancel", response_model=JobStatus, responses=ERRORS, summary="Cancel a job")
    async def cancel(job_id: JobId, jobs: JobsDep) -> JobStatus:
        """Stop a queued or running job; it keeps the chunks it committed, and its result is that prefix."""
        return await jobs.cancel(job_id)

    @router.delete("/jobs/{job_id}", response_model=Deleted, responses=ERRORS, summary="Delete a job and its files")
    async def delete(job_id: JobId, jobs: JobsDep) -> Deleted:
        return await jobs.delete(job_id)

    @router.get(
        "/jobs/{job_id}/result",
        response_class=FileResponse,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "the result file"},
            206: {"description": "the byte range asked for (Range)"},
            416: {"description": "the range starts past the end"},
            410: {"description": "the result file is gone from the disk"},
            **ERRORS,
        },
        summary="Download a job's result",
    )
    async def result(job_id: JobId, request: Request, jobs: JobsDep) -> FileResponse:
        """The result file, with Content-Length, ETag (its sha256, quoted) and Range: a broken download
        resumes with ``Range: bytes=<have>-`` and ``If-Range: <etag>``."""
        path, row = await jobs.result(job_id)
        check_range(request.headers.get("range"), path.stat().st_size)
        return FileResponse(
            path,
            media_type=media_type(path.name),
            filename=f"{row.id}-{path.name}",
            headers={"ETag": f'"{row.result_sha256}"'},
        )

    # HEAD: the size and ETag without the body (FileResponse sends no body to a HEAD)
    router.add_api_route("/jobs/{job_id}/result", result, methods=["HEAD"], include_in_schema=False)
    return router
