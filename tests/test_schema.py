"""schemathesis against the real server's own /openapi.json, over a socket: generated
requests for every operation, fixed seed and bounded examples. No 5xx, and every
response matches its documented status, content type and schema.

The model and version parameters (path and query) are pinned to the ids and versions the
server really holds: a free string there is a 404 decided before the body is read, so
the generated bodies would never reach the multipart or v2 tensor decoding. The test
checks that they did.

`positive_data_acceptance` is left out on purpose: a schema cannot say "a 32x32 image"
or "a tensor of N*3072 values", so schema-valid bodies are rightly refused (422/400)."""

import collections
import json
import urllib.request

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from tests.service_helpers import live_server

EXAMPLES = 25  # per operation: 17 operations, about 425 cases, under a minute
MODEL_PARAMETERS = ("model_name", "model_id", "model")  # path or query
VERSION_PARAMETERS = ("model_version", "version")
INFER = ("POST /v2/models/{model_name}/infer",
         "POST /v2/models/{model_name}/versions/{model_version}/infer")  # fmt: skip


def pin(case: schemathesis.Case, model_id: str, version: str) -> None:
    """Real ids and versions in every model and version parameter the case has: all the
    path ones (required), and the optional query ones schemathesis chose to send."""
    for container in (case.path_parameters, case.query):
        if not isinstance(container, dict):
            continue
        for name in container.keys() & {*MODEL_PARAMETERS, *VERSION_PARAMETERS}:
            container[name] = model_id if name in MODEL_PARAMETERS else version
    if isinstance(case.query, dict) and "version" in case.query:
        case.query["model"] = model_id  # /predict's version belongs to the model asked


def test_every_operation_holds_to_its_schema(models_dir):
    with live_server(models_dir) as port:
        base = f"http://127.0.0.1:{port}"
        served = [
            (m["model_id"], m["version"])
            for m in json.loads(urllib.request.urlopen(f"{base}/models", timeout=30).read())[
                "models"
            ]
        ]
        assert len(served) == 2
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy(), model=st.sampled_from(served))
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,  # the same cases every run
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case, model: tuple[str, str]) -> None:
                pin(case, *model)
                response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
                statuses[case.operation.label][response.status_code] += 1

            check()
    assert {"POST /predict", *INFER, "GET /models"} <= set(statuses)
    # The bodies were read and decoded: refused by the decoders (400, 422) or answered,
    # never turned away by the model lookup that comes first.
    for label in ("POST /predict", *INFER):
        assert statuses[label].keys() & {400, 422}, (label, statuses[label])
        assert 404 not in statuses[label], (label, statuses[label])
    for label in ("GET /models/{model_id}", "GET /v2/models/{model_name}/versions/{model_version}"):
        assert 200 in statuses[label], (label, statuses[label])
