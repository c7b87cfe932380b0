"""schemathesis against the real server's own /openapi.json, over a socket: generated
requests for every operation, fixed seed and bounded examples. No 5xx, and every
response matches its documented status, content type and schema.

`positive_data_acceptance` is left out on purpose: a schema cannot say "a 32x32 image"
or "a tensor of N*3072 values", so schema-valid bodies are rightly refused (422/400)."""

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from tests.service_helpers import live_server

EXAMPLES = 25  # per operation: about 30 s in all


def test_every_operation_holds_to_its_schema(models_dir):
    with live_server(models_dir) as port:
        schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
        checked = []
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,  # the same cases every run
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(excluded_checks=[positive_data_acceptance])

            check()
            checked.append(operation.label)
    assert {"POST /predict", "POST /v2/models/{model_name}/infer", "GET /models"} <= set(checked)
