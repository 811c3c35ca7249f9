"""`swarm-client batch` resumes from its own output: finished lines stay, everything else runs again."""

from __future__ import annotations

import json
from pathlib import Path

from swarm.client.cli.batch import InputLine, plan_resume, read_inputs, resume


def record(line: InputLine, **fields: object) -> str:
    return json.dumps({"line": line.number, "hash": line.key, "request": line.text, **fields})


def test_read_inputs_numbers_lines_as_an_editor_does(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert [(line.number, line.text) for line in read_inputs(source)] == [
        (1, '{"prompt": "a"}'),
        (3, '{"prompt": "b"}'),
    ]


def test_only_results_that_still_answer_their_line_are_kept() -> None:
    a, b, c, d = (InputLine(n, f'{{"prompt": "{n}"}}') for n in range(1, 5))
    changed = InputLine(2, '{"prompt": "old"}')
    existing = [
        record(a, result={}),
        record(changed, result={}),  # the input line changed since
        record(c, error={"type": "swarm_error", "message": "full", "retry": True}),
        record(d, error={"type": "invalid_request_error", "message": "bad", "retry": False}),
        record(a, result={}),  # a duplicate
        '{"line": 2, "hash": "torn',
    ]
    keep, done = plan_resume([a, b, c, d], existing)
    assert keep == [existing[0], existing[3]]
    assert done == {1: False, 4: True}


def test_resume_rewrites_output_without_a_torn_last_line(tmp_path: Path) -> None:
    a, b = InputLine(1, "{}"), InputLine(2, "[]")
    output = tmp_path / "out.jsonl"
    output.write_text(record(a, result={}) + "\n" + '{"line": 2, "ha')
    assert resume(output, [a, b]) == {1: False}
    assert output.read_text() == record(a, result={}) + "\n"
    unchanged = output.stat().st_mtime_ns
    assert resume(output, [a, b]) == {1: False} and output.stat().st_mtime_ns == unchanged
