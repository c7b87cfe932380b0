"""Admin routes: change a model's version safely (service/rollout.py holds the policy).

GET shows the plan, PUT starts or changes a shadow or canary, POST .../promote and
.../rollback end it. Each needs an admin key (ADMIN_KEYS, not an API key); with none set
they answer 403. Every change is written to ROLLOUT_FILE and logged.
"""

from typing import Annotated

from fastapi import APIRouter, Depends

from service.dataplane import DataPlane
from service.errors import NotReady
from service.http.deps import PlaneDep
from service.http.keys import admin_key
from service.rollout import Rollouts
from service.schemas import ErrorBody, RolloutChange, RolloutState

router = APIRouter(prefix="/v1/models/{model_id}/rollout", tags=["rollout"])
AdminDep = Annotated[str, Depends(admin_key)]
ERRORS = {
    401: {"model": ErrorBody, "description": "No admin key, or not one of ADMIN_KEYS"},
    403: {"model": ErrorBody, "description": "ADMIN_KEYS is not set: the routes are off"},
    404: {"model": ErrorBody, "description": "Unknown model"},
    409: {"model": ErrorBody, "description": "The candidate is not a loaded version"},
}


def rollouts_of(plane: DataPlane) -> Rollouts:
    """The plans; NotReady while the lifespan is still loading the models."""
    if plane.rollouts is None:
        raise NotReady(plane.not_ready_reason() or "starting")
    return plane.rollouts


@router.get("", response_model=RolloutState, responses=ERRORS)
async def get_rollout(model_id: str, plane: PlaneDep, by: AdminDep) -> RolloutState:
    """The version serving the model, its candidate (if any) and the latest changes."""
    return RolloutState(**rollouts_of(plane).describe(model_id))


@router.put("", response_model=RolloutState, responses=ERRORS)
async def put_rollout(
    model_id: str, change: RolloutChange, plane: PlaneDep, by: AdminDep
) -> RolloutState:
    """Shadow or canary a candidate version for a share of the requests. Only a version
    the server loaded (its self-check and, with TRUSTED_KEYS, its signature passed) can be
    a candidate: any other is refused (409)."""
    rollouts = rollouts_of(plane)
    rollouts.start(model_id, change.candidate, change.mode, change.share, change.serving, by)
    return RolloutState(**rollouts.describe(model_id))


@router.post("/promote", response_model=RolloutState, responses=ERRORS)
async def promote(model_id: str, plane: PlaneDep, by: AdminDep) -> RolloutState:
    """The candidate becomes the serving version, at once, for every new request."""
    rollouts = rollouts_of(plane)
    rollouts.promote(model_id, by)
    return RolloutState(**rollouts.describe(model_id))


@router.post("/rollback", response_model=RolloutState, responses=ERRORS)
async def rollback(model_id: str, plane: PlaneDep, by: AdminDep) -> RolloutState:
    """The candidate is dropped; the serving version goes on serving (pinned)."""
    rollouts = rollouts_of(plane)
    rollouts.rollback(model_id, by)
    return RolloutState(**rollouts.describe(model_id))
