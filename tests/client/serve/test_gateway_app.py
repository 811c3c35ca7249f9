"""The gateway's HTTP contract without a swarm: an engine stand-in raises the swarm's errors, and each becomes
the status code and OpenAI-shaped message a client can act on; the gateway keeps serving afterwards."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from swarm.client.serve.completions import ChoiceDelta, DeltaSink, GenerationJob, JobResult
from swarm.client.serve.errors import UnknownModelError
from swarm.client.serve.gateway import create_app
from swarm.client.serve.openai_types import CompletionRequest, Usage
from swarm.client.serve.settings import GatewaySettings
from swarm.errors import ErrorCode, MissingLayersError, RemoteError, SwarmFullError

KEY = {"Authorization": "Bearer k"}
JOB = GenerationJob([[1]], ["hi"], 2, 1, 1, 0.0, 1.0, None, 0.0, 0.0, [], None, model="stub")


class ScriptedEngine:
    """Answers every request with `outcome`: an exception to raise, or text to stream before finishing."""

    name = "stub"
    served = ["stub"]
    context_length = 64

    def __init__(self) -> None:
        self.outcome: Exception | str = "ok"

    def completion_job(self, request: CompletionRequest) -> GenerationJob:
        if request.model not in (None, self.name):
            raise UnknownModelError(f"model {request.model!r} is not served here; this gateway serves 'stub'")
        return JOB

    def run(
        self, job: GenerationJob, on_delta: DeltaSink | None = None, cancel: threading.Event | None = None
    ) -> JobResult:
        if on_delta is not None:
            on_delta([ChoiceDelta(0, "partial", [])])
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return JobResult([], Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1))


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def client(engine: ScriptedEngine) -> TestClient:
    return TestClient(create_app(engine, GatewaySettings(api_key="k")), raise_server_exceptions=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "status", "says"),
    [
        (MissingLayersError("stub", 8, [(4, 8)]), 503, "layers 4-7"),
        (SwarmFullError("every peer refused"), 429, "refused"),
        (RuntimeError("boom"), 500, "boom"),
    ],
)
def test_swarm_errors_map_to_status_codes_and_the_gateway_keeps_serving(
    client: TestClient, engine: ScriptedEngine, error: Exception, status: int, says: str
) -> None:
    engine.outcome = error
    response = client.post("/v1/completions", json={"prompt": "hi"}, headers=KEY)
    assert response.status_code == status and says in response.json()["error"]["message"]
    engine.outcome = "ok"
    assert client.post("/v1/completions", json={"prompt": "hi"}, headers=KEY).status_code == 200


def test_an_error_after_streaming_began_arrives_in_the_stream(client: TestClient, engine: ScriptedEngine) -> None:
    engine.outcome = SwarmFullError("gone full")
    response = client.post("/v1/completions", json={"prompt": "hi", "stream": True}, headers=KEY)
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert response.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "partial"
    assert json.loads(events[-2])["error"]["type"] == "swarm_full"


def test_requests_need_the_api_key(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 401
    response = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401 and "--api-key" in response.json()["error"]["message"]
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/v1/models", headers=KEY).json()["data"][0]["id"] == "stub"


def test_invalid_fields_and_unknown_models_are_named(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "hi", "n": 99, "top_p": 2}, headers=KEY)
    assert response.status_code == 422
    assert "n: " in response.json()["error"]["message"] and "top_p: " in response.json()["error"]["message"]
    response = client.post("/v1/completions", json={"prompt": "hi", "model": "gpt-4"}, headers=KEY)
    assert response.status_code == 404 and "'stub'" in response.json()["error"]["message"]


def test_openapi_documents_bounds_and_descriptions(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/generate"} <= set(schema["paths"])
    temperature = schema["components"]["schemas"]["CompletionRequest"]["properties"]["temperature"]
    assert {"type": "number", "minimum": 0.0, "maximum": 2.0} in temperature["anyOf"] and temperature["description"]
    assert {"type": "null"} in temperature["anyOf"]  # null means the default, as OpenAI's clients send it


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/v1/nothing-here", None, 404),
        ("DELETE", "/v1/models", None, 405),
        ("GET", "/v1/completions", None, 405),
        ("POST", "/v1/completions", b'{"prompt": "hi",', 400),
        ("POST", "/v1/completions", b"\xff\xfe not json", 400),
        ("POST", "/v1/completions", b"[1, 2]", 422),
    ],
)
def test_framework_errors_use_the_openai_error_shape(
    client: TestClient, method: str, path: str, body: bytes | None, status: int
) -> None:
    headers = {**KEY, "Content-Type": "application/json"}
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.json()["error"]["message"]


@pytest.mark.parametrize(
    "leak",
    [
        "ws://10.1.2.3:7001",
        "wss://node-7.example.org:443/path",
        "10.1.2.3:7001",
        "node-7.example.org:7001",
        "[fe80::1]:7001",
        "localhost:7001",
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_no_error_message_names_a_peer_address(
    client: TestClient, engine: ScriptedEngine, leak: str, stream: bool
) -> None:
    engine.outcome = RemoteError(ErrorCode.BAD_REQUEST, "batch_size 80 exceeds this node's limit of 64", leak)
    response = client.post("/v1/completions", json={"prompt": "hi", "stream": stream}, headers=KEY)
    assert "64" in response.text and "bad_request" in response.text
    assert leak not in response.text and "7001" not in response.text


def test_openapi_declares_bearer_auth_only_when_an_api_key_is_set(engine: ScriptedEngine) -> None:
    def schemes(app: object) -> dict:
        return TestClient(app).get("/openapi.json").json().get("components", {}).get("securitySchemes", {})

    assert "HTTPBearer" in schemes(create_app(engine, GatewaySettings(api_key="k")))  # type: ignore[arg-type]
    assert schemes(create_app(engine)) == {}  # type: ignore[arg-type]
    assert TestClient(create_app(engine)).get("/v1/models").status_code == 200  # type: ignore[arg-type]


def test_fields_that_contradict_each_other_are_a_400_and_schema_violations_a_422(client: TestClient) -> None:
    contradiction = client.post("/v1/completions", json={"prompt": "hi", "n": 3, "best_of": 2}, headers=KEY)
    assert contradiction.status_code == 400
    assert contradiction.json()["error"]["message"] == "best_of (2) must be at least n (3)"
    violation = client.post("/v1/completions", json={"prompt": "hi", "n": 3, "best_of": "2"}, headers=KEY)
    assert violation.status_code == 422 and violation.json()["error"]["param"] == "best_of"
