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
from hypothesis import HealthCheck, settings
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


schema = schemathesis.pytest.from_fixture("gateway_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_the_schema_allows_or_refuses_gets_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate()
