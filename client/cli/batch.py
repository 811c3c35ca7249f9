"""`swarm-client batch IN.jsonl OUT.jsonl`: many OpenAI completions requests from a file, run concurrently.

Each output line is `{"line", "hash", "request", "result": {"choices", "request_time"}}`, or `"error"` instead of
`"result"` for a line that could not run; lines are written as they finish, each in one `write`. A rerun
resumes: results already in OUT that match their input line (by number and hash) stay, anything else (a line
torn by a kill, results of input lines that changed since, swarm failures worth retrying) is dropped and run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from swarm.client.core.settings import ClientSettings
from swarm.client.serve.completions import CompletionEngine
from swarm.client.serve.errors import InvalidRequestError, UnknownModelError
from swarm.client.serve.openai_format import ResponseMeta, completion_response
from swarm.client.serve.openai_types import CompletionRequest
from swarm.errors import SwarmError

Record = dict[str, object]


@dataclass(frozen=True)
class InputLine:
    number: int
    text: str

    @property
    def key(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def read_inputs(path: Path) -> list[InputLine]:
    """Non-blank lines, numbered from 1 as an editor shows them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [InputLine(number, text.strip()) for number, text in enumerate(lines, 1) if text.strip()]


def plan_resume(inputs: list[InputLine], existing: list[str]) -> tuple[list[str], dict[int, bool]]:
    """Which lines of an earlier OUT to keep, and the input lines they answer (True: with an error)."""
    expected = {line.number: line.key for line in inputs}
    keep: list[str] = []
    done: dict[int, bool] = {}
    for text in existing:
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        number = record.get("line") if isinstance(record, dict) else None
        if number in done or expected.get(number) != record.get("hash"):
            continue
        error = record.get("error")
        if isinstance(error, dict) and error.get("retry"):
            continue
        keep.append(text)
        done[number] = error is not None
    return keep, done


def resume(out_path: Path, inputs: list[InputLine]) -> dict[int, bool]:
    """Prepare OUT for appending; rewrite it (atomically) only when some earlier line must go."""
    if not out_path.exists():
        return {}
    existing = out_path.read_text(encoding="utf-8").split("\n")
    if existing and existing[-1] == "":
        existing.pop()
    keep, done = plan_resume(inputs, existing)
    if keep != existing:
        partial = out_path.with_name(out_path.name + ".partial")
        partial.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
        os.replace(partial, out_path)
    return done


def run_line(engine: CompletionEngine, line: InputLine) -> Record:
    """One input line's output record; errors become records too, so one bad line never stops the rest."""
    record: Record = {"line": line.number, "hash": line.key, "request": line.text}
    try:
        request = CompletionRequest.model_validate_json(line.text)
        record["request"] = json.loads(line.text)
        if request.stream:
            raise InvalidRequestError("stream: batch writes whole results; leave stream out")
        job = engine.completion_job(request)
        started = time.time()
        result = engine.run(job)
        finished = time.time()
    except (ValidationError, InvalidRequestError, UnknownModelError) as exc:
        record["error"] = {"type": "invalid_request_error", "message": _message(exc), "retry": False}
        return record
    except SwarmError as exc:
        record["error"] = {"type": "swarm_error", "message": str(exc), "retry": True}
        return record
    response = completion_response(ResponseMeta(engine.name), job, result)
    record["result"] = {
        "choices": [choice.model_dump() for choice in response.choices],
        "usage": result.usage.model_dump(),
        "request_time": {"start": started, "end": finished, "seconds": round(finished - started, 6)},
    }
    return record


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'line'}: {error['msg']}" for error in exc.errors()
        )
    return str(exc)


def run_batch(engine: CompletionEngine, inputs: list[InputLine], out_path: Path, concurrency: int) -> int:
    """Run every input line not answered in OUT yet; returns how many lines of OUT hold errors."""
    done = resume(out_path, inputs)
    pending = [line for line in inputs if line.number not in done]
    errors = sum(done.values())
    progress = Progress(
        TextColumn("[bold]batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with progress, ThreadPoolExecutor(max_workers=concurrency) as executor:
            task = progress.add_task("batch", total=len(inputs), completed=len(done))
            for future in as_completed([executor.submit(run_line, engine, line) for line in pending]):
                record = future.result()
                os.write(fd, (json.dumps(record) + "\n").encode())
                errors += "error" in record
                progress.advance(task)
    finally:
        os.close(fd)
    return errors


def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    from swarm.client.cli.resolve import open_model

    inputs = read_inputs(Path(args.input))
    model, tokenizer = open_model(settings)
    engine = CompletionEngine(model, tokenizer, model.planner.model_name)
    try:
        errors = run_batch(engine, inputs, Path(args.output), args.concurrency)
    finally:
        engine.close()
        model.close()
    if errors:
        print(f"swarm-client: {errors} line(s) failed; their errors are in {args.output}", file=sys.stderr)
        return 1
    return 0
