"""The HTTP app in this process (no server, no worker): what a bug and an oversized body answer."""

from __future__ import annotations

import asyncio
import logging

import httpx

from pascaline.serve.app import MAX_BODY_BYTES, create_app
from pascaline.serve.events import EventHub
from pascaline.serve.store import JobStore
from pascaline.serve.worker import JobService


def request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_a_bug_answers_500_with_one_sentence_and_logs_its_traceback(tmp_path, caplog):
    store = JobStore(tmp_path)
    app = create_app(JobService(store, EventHub(), tmp_path, loader=None))
    store.close()  # every query now fails: a fault of the server, not of the request
    with caplog.at_level(logging.ERROR, logger="pascaline.serve"):
        response = request(app, "GET", "/v1/jobs/0123")
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "the server failed with an internal error (ProgrammingError); its log has the details.",
        "type": "server_error",
        "code": None,
    }
    (record,) = [r for r in caplog.records if r.name == "pascaline.serve"]
    assert record.getMessage() == "GET /v1/jobs/0123 failed"
    assert record.exc_info[0].__name__ == "ProgrammingError"  # the traceback goes with it


def test_a_body_over_the_limit_is_refused_before_it_is_read(tmp_path):
    app = create_app(JobService(JobStore(tmp_path), EventHub(), tmp_path, loader=None))
    headers = {"content-type": "application/json", "content-length": str(MAX_BODY_BYTES + 1)}
    response = request(app, "POST", "/v1/jobs", content=b"{}", headers=headers)
    assert response.status_code == 413
    message = response.json()["error"]["message"]
    assert message == "the request body is larger than 48 MiB; send a smaller one."


def test_list_fields_arrive_as_json_lists_and_leave_as_the_options_tuples():
    """A tuple field (``slg_layers``) is a JSON list on the wire: pydantic's strict mode must take it."""
    from pascaline.runtime.requests import parse_request
    from pascaline.serve.app import ImagesBody, JobBody

    for body in (JobBody, ImagesBody):
        given = body.model_validate({"prompt": "a", "slg_layers": [7, 8, 9], "slg_scale": 2.5})
        request = parse_request(given.model_dump(exclude_unset=True))
        assert request.options.slg_layers == (7, 8, 9)
    assert JobBody.model_json_schema()["properties"]["slg_layers"]["anyOf"][0]["type"] == "array"
