"""A fake kvclip server for client tests: an httpx.MockTransport handler answering from a
script, and helpers to read what the client sent."""
from __future__ import annotations

import io

import httpx
import numpy as np
import python_multipart
from PIL import Image

from kvclip.clients import KvclipClient

URL = "http://kvclip.test"


def error(status: int, code: str, message: str, headers: dict | None = None, details=None) -> httpx.Response:
    """The server's JSON error answer."""
    body = {"code": code, "message": message} | ({"details": details} if details else {})
    return httpx.Response(status, json={"error": body}, headers=headers)


def job_json(state: str, **fields) -> dict:
    return {"id": "ab12", "cache": "pets", "state": state, "step": None, "done": 0, "total": 0,
            "elapsed_s": 0.0, "eta_s": None, "created_at": "2024-01-01T00:00:00+00:00",
            "finished_at": None, "version": None, "activated": False, "error": None, "report": None,
            "options": {}} | fields


def build_script(*states: dict) -> Recorder:
    """202 with the first job state, then one GET /v1/jobs/{id} answer per later state."""
    return Recorder(httpx.Response(202, json=states[0]), *(httpx.Response(200, json=s) for s in states[1:]))


class Recorder:
    """Answers requests from a list (the last answer repeats), keeping every request with its
    body read. An exception in the list is raised instead of answering (connection errors)."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_client(handler: Recorder, **kwargs) -> tuple[KvclipClient, list[float]]:
    """A client on the fake transport whose sleeps are recorded instead of slept."""
    sleeps: list[float] = []
    kwargs.setdefault("backoff", 0.1)
    client = KvclipClient(URL, transport=httpx.MockTransport(handler), sleep=sleeps.append, **kwargs)
    return client, sleeps


def multipart(request: httpx.Request) -> tuple[dict[str, str], list[tuple[str, str, bytes]]]:
    """(form fields, [(field, file name, bytes)] in order) of a multipart request."""
    fields, files = {}, []

    def on_file(f) -> None:
        f.file_object.seek(0)
        files.append((f.field_name.decode(), f.file_name.decode(), f.file_object.read()))

    body = request.content
    python_multipart.parse_form(
        {"Content-Type": request.headers["content-type"].encode(), "Content-Length": str(len(body)).encode()},
        io.BytesIO(body), lambda f: fields.__setitem__(f.field_name.decode(), f.value.decode()), on_file)
    return fields, files


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`kvclip ARGV...` in-process: (exit code, stdout, stderr)."""
    from kvclip.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
