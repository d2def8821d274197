"""The API held to its own OpenAPI schema by a fuzzer: Schemathesis generates requests for every operation of
`/openapi.json` (valid ones, and invalid ones), sends them with an API key to a real
`cm-diffusers serve` on loopback, and checks that no answer is a 5xx, that every status code is one the operation
documents, and that every body conforms to the documented schema. The seed and the number of examples are printed,
so a failure can be replayed (CM_SCHEMATHESIS_SEED, CM_SCHEMATHESIS_EXAMPLES)."""

import os
from collections import Counter

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
schemathesis = pytest.importorskip("schemathesis", reason="needs the test extra: pip install -e '.[serve,test]'")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cm_diffusers.serving.local import LocalServer  # noqa: E402

KEY = "schema-key-" + "s" * 20
SEED = int(os.environ.get("CM_SCHEMATHESIS_SEED", "1"))
EXAMPLES = int(os.environ.get("CM_SCHEMATHESIS_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("schema")
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIFFUSERS_API_KEYS=KEY)
    # Small limits keep generated requests fast; the rate limits are off so that the fuzzer is never refused.
    command = ["serve", "--model", "fashion-mnist-cd", "--device", "cpu", "--max_images", "4", "--max_steps", "4",
               "--max_batch_size", "4", "--rate_limit", "0", "--auth_failures_per_minute", "0"]  # fmt: skip
    with LocalServer(command, log_path=folder / "server.log", env=env) as local:
        yield local


def test_every_operation_conforms_to_the_openapi_schema(server, capsys):
    # health, readiness, metrics, models, generate, teacher, 5 edit tasks
    fuzz_every_operation(server.url, KEY, capsys, minimum_operations=10)


def fuzz_every_operation(url: str, key: str, capsys, minimum_operations: int):
    """Schemathesis over every operation of the server at `url`: positive and negative cases, CHECKS on each."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= minimum_operations
    failures = []
    with capsys.disabled():
        print(f"\nschemathesis {schemathesis.__version__}: {len(operations)} operations, seed {SEED}, at most "
              f"{EXAMPLES} examples each (replay: CM_SCHEMATHESIS_SEED={SEED} CM_SCHEMATHESIS_EXAMPLES={EXAMPLES})")
    for operation in operations:
        statuses = []
        cases = st.one_of(operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
                          operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))

        @seed(SEED)
        @given(case=cases)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                              checks=CHECKS, timeout=60)
            statuses.append(response.status_code)

        try:
            run()
        except Exception as error:  # keep going: report every operation that fails
            failures.append(f"{operation.method.upper()} {operation.path}: {str(error)[:2000]}")
        with capsys.disabled():
            print(f"  {operation.method.upper():5} {operation.path}: {len(statuses)} requests, statuses "
                  f"{dict(sorted(Counter(statuses).items()))}")
    assert not failures, "\n\n".join(failures)
