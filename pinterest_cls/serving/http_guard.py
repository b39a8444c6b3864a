"""The request guard of ``mlflow models serve``: requests it must not pass on to the model are answered here, each
with a 4xx status and a one-line JSON message, and no answer carries a stack trace, the request's data or a server
path.

MLflow's scoring server hands each ``/invocations`` request to ``mlflow.pyfunc.scoring_server.invocations``. When
the served model loads (``PinterestPyfuncModel.load_context``), that function is wrapped once:

- no ``Content-Type`` -> 415; an empty body -> 400; a body over ``ServeLimits.max_body_bytes`` -> 413;
- a body MLflow cannot parse (not JSON, not a DataFrame, not the model's signature) -> 400;
- a request the model refuses as a whole (``RequestRefused``: too many rows, no image column) -> its status;
- anything else that fails -> 500, with one line.

A bad row is not a bad request: the model answers it as a failed row beside the others.
"""

from __future__ import annotations

import json
import logging

from pinterest_cls.serving.limits import ServeLimits

log = logging.getLogger(__name__)


class RequestRefused(Exception):
    """A request the served model refuses as a whole: ``status`` (4xx) and a one-line ``line``."""

    def __init__(self, status: int, line: str):
        super().__init__(line)
        self.status, self.line = status, line


def _answer(status: int, line: str, code: str = "BAD_REQUEST"):
    from mlflow.pyfunc.scoring_server import InvocationsResponse

    body = json.dumps({"error_code": code, "message": " ".join(str(line).split())[:300]})
    return InvocationsResponse(response=body, status=status, mimetype="application/json")


def _first_sentence(message: str) -> str:
    """The gist of an MLflow parsing error, without the data it may quote."""
    text = " ".join(str(message).split())
    for cut in (" Input:", " Received", " Error: '", "'. ", ". "):
        if cut in text:
            text = text.split(cut, 1)[0]
    return text[:160]


def install_request_guard(limits: ServeLimits) -> bool:
    """Wrap MLflow's ``invocations`` with the checks above (once per process); False where MLflow's scoring server
    is not importable."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc import scoring_server
    except ImportError:
        return False
    current = scoring_server.invocations
    original = getattr(current, "unguarded", current)

    def guarded(data, content_type, model, input_schema):
        if not content_type:
            return _answer(415, "the request has no Content-Type; send application/json")
        if not data or not bytes(data).strip():
            return _answer(400, 'the request body is empty; send {"dataframe_split": {"columns": ["image"], '
                                '"data": [["<base64 image bytes>"]]}}')
        if len(data) > limits.max_body_bytes:
            return _answer(413, f"the request body is {len(data)} bytes, more than the {limits.max_body_bytes} this "
                                "server takes (PINTEREST_CLS_SERVE_MAX_BODY_BYTES)", "REQUEST_TOO_LARGE")
        try:
            return original(data, content_type, model, input_schema)
        except RequestRefused as exc:
            return _answer(exc.status, exc.line)
        except MlflowException as exc:
            refused = next((c for c in (exc.__cause__, exc.__context__) if isinstance(c, RequestRefused)), None)
            if refused is not None:
                return _answer(refused.status, refused.line)
            return _answer(400, f"the request is malformed: {_first_sentence(exc.message)}")
        except (UnicodeDecodeError, ValueError) as exc:
            return _answer(400, f"the request is malformed: {type(exc).__name__}")
        except Exception as exc:  # never a stack trace to the client; the server's log has it
            log.exception("the served model failed on a request")
            return _answer(500, f"the server failed on this request ({type(exc).__name__})", "INTERNAL_ERROR")

    guarded.unguarded = original
    scoring_server.invocations = guarded
    return True
