"""The gateway's OpenAPI schema, fuzzed by schemathesis in-process (ASGI) against a gateway on a real tiny model,
with every default check: no request gets a server error, every response matches the schema, what the schema
refuses is refused (422) and what it allows is accepted. The one allowance: a schema-valid request may get a
400 for what JSON schema cannot say (a prompt longer than the model's context in tokens, more sequences than a
node batches, fields that contradict each other), as OpenAI answers those."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.client.serve.completions import CompletionEngine
from swarm.client.serve.gateway import create_app
from swarm.client.serve.settings import GatewaySettings
from tests.checkpoints import build_tiny_llama

API_KEY = "fuzz"
ACCEPTED = ["2xx", "400", "401", "404", "429"]


@pytest.fixture(scope="module")
def gateway_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    """A 2-layer tiny-llama with a 72-token context, at most 2 sequences a request: no example takes long."""
    folder = tmp_path_factory.mktemp("fuzz") / "tiny-llama"
    checkpoint = build_tiny_llama(folder, max_position_embeddings=72, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    engine = CompletionEngine(model, tokenizer, "tiny", max_rows=2)  # type: ignore[arg-type]
    app = create_app(engine, GatewaySettings(api_key=API_KEY))
    config = SchemathesisConfig.from_dict(
        {
            "headers": {"Authorization": f"Bearer {API_KEY}"},
            "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}},
        }
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    engine.close()


EXAMPLES_PER_OPERATION = 20


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
def test_no_request_the_schema_allows_or_refuses_gets_a_server_error(
    gateway_schema: schemathesis.BaseSchema, mode: GenerationMode
) -> None:
    """Every operation, with requests the schema allows (positive) and refuses (negative). Driven through plain
    hypothesis rather than schemathesis' pytest plugin, which reaches into pytest's internals."""
    operations = [result.ok() for result in gateway_schema.get_all_operations()]
    checked_negative = {operation.label for operation in operations}
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(operation.as_strategy(generation_mode=mode))
        def each_request(case: schemathesis.Case) -> None:
            case.call_and_validate()

        try:
            each_request()
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                raise
            checked_negative.discard(operation.label)  # nothing to get wrong (`GET /v1/models` takes no input)
    assert mode is GenerationMode.POSITIVE or len(checked_negative) >= 2, checked_negative
