"""For operators: liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.http.deps import PlaneDep
from service.http.keys import metrics_token
from service.metrics import exposition
from service.schemas import ErrorBody, Health

router = APIRouter(tags=["operations"])


@router.get("/health/live", response_model=Health)
def live() -> Health:
    """The process is up and answering."""
    return Health(status="ok")


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health}})
def ready(plane: PlaneDep) -> Health | JSONResponse:
    """200 once a model is loaded, warmed up and its batcher running; 503 with the reason
    otherwise, and from the moment the server is told to stop (SIGTERM)."""
    if (reason := plane.not_ready_reason()) is None:
        return Health(status="ready")
    return JSONResponse(Health(status="not ready", detail=reason).model_dump(), status_code=503)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_token)],
    responses={401: {"model": ErrorBody, "description": "METRICS_TOKEN is set"}},
)
def metrics(plane: PlaneDep) -> Response:
    """Prometheus text format: requests and latency per route, model and status; batch sizes."""
    return Response(exposition(plane.metrics), media_type=CONTENT_TYPE_LATEST)
