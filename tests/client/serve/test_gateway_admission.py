"""What the gateway admits, and when: a body size limit, work kept off the event loop, per-key limits on
requests in flight, requests and tokens per minute (typed 429s with `Retry-After`), and fair sharing of the
generation slots between keys. An engine stand-in makes tokenizing and generating as slow as each test needs."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi.testclient import TestClient

from swarm.client.serve.completions import DeltaSink, GenerationJob, JobResult
from swarm.client.serve.gateway import create_app
from swarm.client.serve.openai_types import CompletionRequest, Usage
from swarm.client.serve.settings import GatewaySettings

KEYS = {"a": {"Authorization": "Bearer key-a"}, "b": {"Authorization": "Bearer key-b"}}


class PacedEngine:
    """Tokenizes and generates instantly, unless a test holds `tokenizing` or sets `run_seconds`; records the
    order in which prompts start generating."""

    name = "stub"
    served = ["stub"]
    context_length = 512

    def __init__(self) -> None:
        self.tokenize_started = threading.Event()
        self.tokenizing = threading.Event()
        self.tokenizing.set()
        self.run_seconds = 0.0
        self.started: list[str] = []

    def completion_job(self, request: CompletionRequest) -> GenerationJob:
        self.tokenize_started.set()
        assert self.tokenizing.wait(10)
        text = request.prompt if isinstance(request.prompt, str) else "ids"
        ids = list(range(1, len(text) + 1))
        max_new = 16 if request.max_tokens is None else request.max_tokens
        return GenerationJob([ids], [text], max_new, 1, 1, 0.0, 1.0, None, 0.0, 0.0, [], None, model=self.name)

    def run(
        self, job: GenerationJob, on_delta: DeltaSink | None = None, cancel: threading.Event | None = None
    ) -> JobResult:
        self.started.append(job.prompt_texts[0])
        time.sleep(self.run_seconds)
        prompt = len(job.prompts[0])
        return JobResult([], Usage(prompt_tokens=prompt, completion_tokens=0, total_tokens=prompt))


@pytest.fixture
def engine() -> PacedEngine:
    return PacedEngine()


def settings(**fields: object) -> GatewaySettings:
    return GatewaySettings(api_key=["key-a", "key-b"], **fields)


def client(engine: PacedEngine, **fields: object) -> TestClient:
    return TestClient(create_app(engine, settings(**fields)), raise_server_exceptions=False)  # type: ignore[arg-type]


@asynccontextmanager
async def async_client(engine: PacedEngine, **fields: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(engine, settings(**fields))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        yield http


def assert_rate_limited(response: httpx.Response, says: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert says in error["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_parsed(engine: PacedEngine) -> None:
    http = client(engine, max_body_bytes=2048)
    response = http.post("/v1/completions", json={"prompt": "x" * 4096}, headers=KEYS["a"])
    assert response.status_code == 413 and "2048 bytes" in response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "invalid_request_error"
    chunks = iter([b'{"prompt": "', b"x" * 4096, b'"}'])  # no Content-Length: counted as it arrives
    response = http.post("/v1/completions", content=chunks, headers={**KEYS["a"], "Content-Type": "application/json"})
    assert response.status_code == 413
    assert not engine.started
    assert http.post("/v1/completions", json={"prompt": "x" * 100}, headers=KEYS["a"]).status_code == 200


def test_other_requests_are_answered_while_a_prompt_is_being_tokenized(engine: PacedEngine) -> None:
    engine.tokenizing.clear()

    async def scenario() -> float:
        async with async_client(engine) as http:
            slow = asyncio.create_task(http.post("/v1/completions", json={"prompt": "long"}, headers=KEYS["a"]))
            assert await asyncio.to_thread(engine.tokenize_started.wait, 5)
            began = time.monotonic()
            models = await http.get("/v1/models", headers=KEYS["b"])
            waited = time.monotonic() - began
            engine.tokenizing.set()
            assert models.status_code == 200 and (await slow).status_code == 200
            return waited

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) < 1.0


def test_each_key_may_have_only_so_many_requests_in_flight(engine: PacedEngine) -> None:
    engine.run_seconds = 0.5

    async def scenario() -> list[httpx.Response]:
        async with async_client(engine, key_max_concurrency=1) as http:
            first = asyncio.create_task(http.post("/v1/completions", json={"prompt": "a1"}, headers=KEYS["a"]))
            await asyncio.sleep(0.2)
            second = await http.post("/v1/completions", json={"prompt": "a2"}, headers=KEYS["a"])
            other = await http.post("/v1/completions", json={"prompt": "b1"}, headers=KEYS["b"])
            return [await first, second, other]

    first, second, other = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert first.status_code == 200 and other.status_code == 200
    assert_rate_limited(second, "1 request")


def test_requests_per_minute_are_counted_per_key(engine: PacedEngine) -> None:
    http = client(engine, key_requests_per_minute=2)
    for _ in range(2):
        assert http.post("/v1/completions", json={"prompt": "a"}, headers=KEYS["a"]).status_code == 200
    assert_rate_limited(http.post("/v1/completions", json={"prompt": "a"}, headers=KEYS["a"]), "2 requests per minute")
    assert http.post("/v1/completions", json={"prompt": "b"}, headers=KEYS["b"]).status_code == 200


def test_tokens_per_minute_count_the_prompt_and_the_tokens_asked_for(engine: PacedEngine) -> None:
    http = client(engine, key_tokens_per_minute=40)
    body = {"prompt": "x" * 10, "max_tokens": 16}  # 10 prompt tokens + up to 16 new: 26
    assert http.post("/v1/completions", json=body, headers=KEYS["a"]).status_code == 200
    # it used 10 of its 26: 30 are left, enough for 10 + 16 again but not for 10 + 24
    assert http.post("/v1/completions", json=body, headers=KEYS["a"]).status_code == 200
    assert_rate_limited(
        http.post("/v1/completions", json={**body, "max_tokens": 24}, headers=KEYS["a"]), "tokens per minute"
    )
    assert_rate_limited(
        http.post("/v1/completions", json={"prompt": "x" * 50, "max_tokens": 1}, headers=KEYS["b"]), "40 tokens"
    )
    assert http.post("/v1/completions", json=body, headers=KEYS["b"]).status_code == 200


def test_a_key_flooding_the_gateway_cannot_starve_another_key(engine: PacedEngine) -> None:
    engine.run_seconds = 0.1

    async def scenario() -> list[str]:
        async with async_client(engine, max_concurrency=1) as http:
            flood = [
                asyncio.create_task(http.post("/v1/completions", json={"prompt": f"a{i}"}, headers=KEYS["a"]))
                for i in range(8)
            ]
            await asyncio.sleep(0.05)
            served = await http.post("/v1/completions", json={"prompt": "b"}, headers=KEYS["b"])
            assert served.status_code == 200
            assert all(response.status_code == 200 for response in await asyncio.gather(*flood))
            return engine.started

    started = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert len(started) == 9 and started.index("b") <= 2, started
