"""taskwatch in a FastAPI app whose lifespan owns the engine: `uvicorn examples.web_app:app`.

TASKWATCH_STORE picks where runs live (`sqlite:///runs.db` keeps them across restarts; the
default, memory, does not). TASKWATCH_CONTROL, a Unix socket path, lets
`taskwatch attach PATH` show this app's runs live (`{pid}` in it: one per worker process).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from taskwatch.engine import (
    Engine,
    InvalidParams,
    InvalidQuery,
    QueueFull,
    RunNotCancellable,
    RunNotFound,
    TaskContext,
    TaskwatchError,
)

# a bounded queue: a request past it is answered 503 at once instead of waiting behind hours of work
engine = Engine(store=os.environ.get("TASKWATCH_STORE", "memory"), max_queue=100)


class ReportParams(BaseModel):
    user_id: str = Field(max_length=200)  # params are stored with the run: bound what a client sends
    pages: int = Field(10, ge=1, le=50)
    delay: float = Field(0.0, ge=0, le=30)  # seconds the whole report takes: a stand-in for real work


# rendering is heavy: two at a time, whatever else the engine runs
@engine.task(name="render_report", timeout=60.0, concurrency=2)
async def render_report(ctx: TaskContext, params: ReportParams) -> dict[str, Any]:
    for page in range(1, params.pages + 1):
        await asyncio.sleep(params.delay / params.pages)
        await ctx.progress(page, params.pages, f"rendered page {page}")
    return {"user_id": params.user_id, "pages": params.pages}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine:  # started before the first request; stopped, and awaited, at shutdown
        if control := os.environ.get("TASKWATCH_CONTROL"):
            # "{pid}" in the path gives each worker of `uvicorn --workers N` a socket of its own
            await engine.serve(control.format(pid=os.getpid()))  # 0600; the engine's stop closes it
        yield


# taskwatch's messages already say what went wrong and what to do: pass them on as they are
HTTP_STATUS: dict[type[TaskwatchError], int] = {
    InvalidParams: 422,
    InvalidQuery: 422,
    RunNotFound: 404,
    RunNotCancellable: 409,
    QueueFull: 503,
}


async def taskwatch_error(request: Request, exc: Exception) -> JSONResponse:
    status = next(code for error, code in HTTP_STATUS.items() if isinstance(exc, error))
    body: dict[str, Any] = {"detail": str(exc)}
    if isinstance(exc, InvalidParams):
        body["errors"] = exc.errors  # pydantic's list, for a form to mark its fields
    # a full queue is back-pressure, not a failure: the client may come back
    headers = {"Retry-After": "5"} if isinstance(exc, QueueFull) else None
    return JSONResponse(body, status_code=status, headers=headers)


app = FastAPI(lifespan=lifespan, exception_handlers={error: taskwatch_error for error in HTTP_STATUS})


@app.post("/reports", status_code=202)
async def submit_report(body: Annotated[dict[str, Any], Body()], response: Response) -> dict[str, str]:
    # the engine validates the params itself, so a refused request records nothing
    handle = await engine.submit("render_report", body)
    response.headers["Location"] = f"/runs/{handle.id}"
    return {"run_id": handle.id}


@app.get("/runs/{run_id}")
async def get_run(run_id: str) -> dict[str, Any]:
    # fetch_run also reads the store: a run from before a restart, or another process's
    record = await engine.fetch_run(run_id)
    return record.model_dump(mode="json")


@app.get("/runs")
async def list_runs(limit: int = 50) -> list[dict[str, Any]]:
    # from the store, newest first: every worker of `uvicorn --workers N` answers the same
    page = await engine.query_runs(limit=limit)
    return [record.model_dump(mode="json") for record in page.runs]


@app.delete("/runs/{run_id}")
async def cancel_run(run_id: str) -> dict[str, Any]:
    record = await engine.cancel(run_id)
    return record.model_dump(mode="json")
