"""Changing a model's version while serving (service/rollout.py): a canary's share and its
stickiness, promotion and rollback under load with no request lost, candidates the server
did not load refused, the rollout file, and the admin routes' keys; over real sockets."""

import concurrent.futures
import json
import math
import threading
import time

import pytest

from tests.rollouts import (
    ADMIN,
    MODEL,
    call,
    coloured_images,
    metric,
    metrics_of,
    tiny_version,
    v2_body,
)
from tests.service_helpers import live_server
from tests.signing import make_key
from training.sign import sign_file


@pytest.fixture
def folder(tmp_path):
    """A models folder with two loaded versions of MODEL (serving, candidate) and a third
    whose self-check fails (never loaded); their versions."""
    models = tmp_path / "models"
    models.mkdir()
    serving = tiny_version(models / "a.onnx", 0)
    candidate = tiny_version(models / "b.onnx", 10)
    broken = tiny_version(models / "c.onnx", 10, broken=True)
    # Two files of the same bytes are refused as duplicates: c must differ from b.
    assert broken != candidate
    return models, serving, candidate, broken


def infer(base: str, key: str | None = None, images=None) -> str:
    """The version that answered one /v2 request (with `X-Rollout-Key: key`)."""
    images = coloured_images(1, 0) if images is None else images
    headers = {} if key is None else {"X-Rollout-Key": key}
    status, reply = call(base, "POST", f"/v2/models/{MODEL}/infer", v2_body(images), None,
                         headers)  # fmt: skip
    assert status == 200, reply
    return reply["model_version"]


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(n * p * (1 - p))


def test_a_canary_answers_its_share_of_callers_and_each_caller_stays_on_its_side(folder):
    models, serving, candidate, _ = folder
    with live_server(models, admin_keys=ADMIN) as port:
        base = f"http://127.0.0.1:{port}"
        body = {"candidate": candidate, "mode": "canary", "share": 0.3, "serving": serving}
        status, state = call(base, "PUT", f"/v1/models/{MODEL}/rollout", body)
        assert status == 200, state
        assert (state["serving"], state["candidate"], state["mode"]) == (serving, candidate,
                                                                          "canary")  # fmt: skip
        callers = 300
        first = {f"client-{i}": infer(base, f"client-{i}") for i in range(callers)}
        assert set(first.values()) <= {serving, candidate}
        on_candidate = sum(version == candidate for version in first.values())
        assert abs(on_candidate - 0.3 * callers) <= binomial_bound(callers, 0.3), on_candidate
        # Sticky: the same callers again, each answered by the same version as before.
        again = {key: infer(base, key) for key in list(first)[:40]}
        assert again == {key: first[key] for key in again}
        # Without a key, each request is drawn: the same share, over requests.
        drawn = [infer(base) for _ in range(200)]
        count = drawn.count(candidate)
        assert abs(count - 0.3 * 200) <= binomial_bound(200, 0.3), count
        # Requests that name a version get it, whatever the plan.
        status, reply = call(base, "POST", f"/v2/models/{MODEL}/versions/{serving}/infer",
                             v2_body(coloured_images(1, 0)), None)  # fmt: skip
        assert status == 200 and reply["model_version"] == serving
        # The canary's counts are the per-version series there already were.
        answered = [*first.values(), *again.values(), *drawn]
        text = metrics_of(base)
        for version in (serving, candidate):
            count = metric(text, "images_classified_total", model=MODEL, version=version)
            assert count == answered.count(version) + (version == serving), version


def test_promote_and_roll_back_under_load_lose_no_request(folder):
    models, serving, candidate, _ = folder
    with live_server(models, admin_keys=ADMIN, max_queue_delay_ms=0) as port:
        base = f"http://127.0.0.1:{port}"
        path = f"/v1/models/{MODEL}/rollout"
        assert call(base, "PUT", path, {"candidate": candidate, "mode": "shadow", "share": 0.5,
                                        "serving": serving})[0] == 200  # fmt: skip
        stop = threading.Event()
        answered: list[str] = []

        def client(number: int) -> list[str]:
            outcomes = []
            images = coloured_images(2, number)
            while not stop.is_set():
                headers = {"X-Rollout-Key": f"load-{number}-{len(outcomes)}"}
                status, reply = call(base, "POST", f"/v2/models/{MODEL}/infer",
                                     v2_body(images), None, headers)  # fmt: skip
                outcome = reply["model_version"] if status == 200 else f"{status} {reply}"
                outcomes.append(outcome)
                answered.append(outcome)
            return outcomes

        def wait_for(count: int) -> None:
            target = len(answered) + count
            deadline = time.monotonic() + 60
            while len(answered) < target:
                assert time.monotonic() < deadline, "the load stopped"
                time.sleep(0.01)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client, n) for n in range(4)]
            try:
                wait_for(20)
                body = {"candidate": candidate, "mode": "canary", "share": 0.5}
                assert call(base, "PUT", path, body)[0] == 200
                wait_for(20)
                status, state = call(base, "POST", f"{path}/promote")
                assert status == 200 and state["serving"] == candidate, state
                assert state["candidate"] is None and state["pinned"]
                since = len(answered)
                wait_for(20)
                assert set(answered[since + 8 :]) == {candidate}  # in flight may finish on a
                body = {"candidate": serving, "mode": "canary", "share": 1.0}
                assert call(base, "PUT", path, body)[0] == 200
                wait_for(20)
                status, state = call(base, "POST", f"{path}/rollback")
                assert status == 200 and state["serving"] == candidate, state
                since = len(answered)
                wait_for(20)
                assert set(answered[since + 8 :]) == {candidate}
            finally:
                stop.set()
            outcomes = [o for future in clients for o in future.result(timeout=60)]
        status, state = call(base, "GET", path)
        changes = [event["change"] for event in state["history"]]
    failed = [outcome for outcome in outcomes if outcome not in (serving, candidate)]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"
    assert {serving, candidate} <= set(outcomes)
    assert changes == ["shadow started", "canary started", "promoted", "canary started",
                       "rolled back"]  # fmt: skip


def test_a_candidate_the_server_did_not_load_is_refused(folder):
    models, serving, candidate, broken = folder
    with live_server(models, admin_keys=ADMIN) as port:
        base = f"http://127.0.0.1:{port}"
        path = f"/v1/models/{MODEL}/rollout"
        status, listing = call(base, "GET", "/models", token=None)
        assert "c.onnx" in listing["failed"], listing  # its self-check failed
        for mode in ("shadow", "canary"):
            body = {"candidate": broken, "mode": mode, "share": 0.1, "serving": serving}
            status, reply = call(base, "PUT", path, body)
            assert status == 409, reply
            assert broken in reply["detail"] and "c.onnx" in reply["detail"], reply
        status, reply = call(base, "POST", f"{path}/promote")
        assert status == 409 and "no candidate to promote" in reply["detail"]
        body = {"candidate": serving, "mode": "shadow", "share": 0.1, "serving": serving}
        assert call(base, "PUT", path, body)[0] == 409  # a candidate must be another version
        body = {"candidate": candidate, "mode": "shadow", "share": 1.5}
        assert call(base, "PUT", path, body)[0] == 422  # the share is a share
        assert call(base, "GET", "/v1/models/nope/rollout")[0] == 404
        status, state = call(base, "GET", path)
        assert status == 200 and state["candidate"] is None and state["history"] == []


def test_the_admin_routes_need_an_admin_key_and_are_off_without_admin_keys(folder):
    models, serving, candidate, _ = folder
    path = f"/v1/models/{MODEL}/rollout"
    with live_server(models, api_keys="api-token") as port:
        base = f"http://127.0.0.1:{port}"
        status, reply = call(base, "GET", path, token="api-token")
        assert status == 403 and "ADMIN_KEYS" in reply["detail"]
    with live_server(models, admin_keys=f"{ADMIN},other", api_keys="api-token") as port:
        base = f"http://127.0.0.1:{port}"
        body = {"candidate": candidate, "mode": "shadow", "share": 0.1, "serving": serving}
        for token in (None, "api-token", "wrong"):  # an API key is not an admin key
            for method, where, sent in (("GET", path, None), ("PUT", path, body),
                                        ("POST", f"{path}/promote", None),
                                        ("POST", f"{path}/rollback", None)):  # fmt: skip
                status, reply = call(base, method, where, sent, token=token)
                assert status == 401, (token, method, where, reply)
        assert call(base, "GET", path, token="other")[0] == 200


def test_the_rollout_file_is_written_by_the_routes_and_read_on_reload(folder):
    models, serving, candidate, broken = folder
    with live_server(models, admin_keys=ADMIN, model_poll_seconds=0.05) as port:
        base = f"http://127.0.0.1:{port}"
        path = f"/v1/models/{MODEL}/rollout"
        body = {"candidate": candidate, "mode": "shadow", "share": 0.25, "serving": serving}
        status, state = call(base, "PUT", path, body)
        assert status == 200 and state["written"] is True
        assert state["file"] == str(models / "rollout.json")
        written = json.loads((models / "rollout.json").read_text())
        assert written == {"models": {MODEL: {**body}}}
        # An operator edits the file: every caller to the candidate.
        plan = {"serving": serving, "candidate": candidate, "mode": "canary", "share": 1.0}
        (models / "rollout.json").write_text(json.dumps({"models": {MODEL: plan}}))
        deadline = time.monotonic() + 30
        while call(base, "GET", path)[1]["mode"] != "canary":
            assert time.monotonic() < deadline, "the file was not read"
            time.sleep(0.05)
        assert {infer(base, f"k{i}") for i in range(10)} == {candidate}
        # A file naming a version that did not load is not applied: the plan stays.
        bad = {**plan, "candidate": broken}
        (models / "rollout.json").write_text(json.dumps({"models": {MODEL: bad}}))
        time.sleep(0.5)
        state = call(base, "GET", path)[1]
        assert state["candidate"] == candidate and state["mode"] == "canary"
        # The candidate's file removed: the plan drops it; the serving version stays.
        (models / "b.onnx").unlink()
        deadline = time.monotonic() + 30
        while call(base, "GET", path)[1]["candidate"] is not None:
            assert time.monotonic() < deadline, "the candidate was not dropped"
            time.sleep(0.05)
        assert {infer(base, f"k{i}") for i in range(10)} == {serving}


def test_an_unsigned_candidate_is_refused_where_trusted_keys_are_set(tmp_path):
    """With TRUSTED_KEYS, a version whose signature does not verify is never loaded, so it
    can be neither shadowed, canaried nor promoted."""
    models = tmp_path / "models"
    models.mkdir()
    private, public, _ = make_key(tmp_path, "signing")
    serving = tiny_version(models / "a.onnx", 0)
    sign_file(models / "a.onnx", private)
    unsigned = tiny_version(models / "b.onnx", 10)  # loadable, but not signed
    with live_server(models, admin_keys=ADMIN, trusted_keys=public) as port:
        base = f"http://127.0.0.1:{port}"
        status, listing = call(base, "GET", "/models", token=None)
        assert "b.onnx" in listing["failed"], listing
        for mode in ("shadow", "canary"):
            body = {"candidate": unsigned, "mode": mode, "share": 0.5, "serving": serving}
            status, reply = call(base, "PUT", f"/v1/models/{MODEL}/rollout", body)
            assert status == 409 and "b.onnx" in reply["detail"], reply
        assert call(base, "POST", f"/v1/models/{MODEL}/rollout/promote")[0] == 409
