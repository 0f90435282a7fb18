"""JSON over HTTP to a teacher server (`vllm serve`): each request with a timeout, retries with
exponential backoff, and errors that name the URL and what went wrong, never a hang.

    client = ServerClient("http://127.0.0.1:8000", timeout_s=120, retries=3, concurrency=4)
    client.get("/v1/models"); client.post_all("/v1/completions", [body, body, ...])

Standard library only (urllib). Requests go straight to the configured address: no proxy
from the environment and no redirect is followed, so the API key (a bearer token, if any)
reaches that address only; it never appears in a message.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from opd.errors import UserError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # worth sending again
BACKOFF_S = 0.5  # the first retry waits this long; each next one twice as long


class ServerError(UserError, RuntimeError):
    """The teacher server is down, too slow, or answered wrongly; the message names the URL
    and the status or reason. `status`: the HTTP status, when there was an answer."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    """A failure that may pass: no connection, a timeout, a 429 or 5xx answer."""

    def __init__(self, reason: str, status: Optional[int] = None):
        super().__init__(reason)
        self.reason, self.status = reason, status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx becomes an HTTPError: the answer is wrong, and the key stays here


class ServerClient:
    """One server's address, its timeout and retry policy, and its API key (if any)."""

    def __init__(self, url: str, timeout_s: float, retries: int, concurrency: int,
                 api_key: Optional[str] = None):
        self.url, self.timeout_s, self.retries, self.concurrency = url.rstrip("/"), timeout_s, retries, concurrency
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def get(self, path: str, retries: Optional[int] = None) -> Any:
        return self._request("GET", path, None, self.retries if retries is None else retries)

    def post(self, path: str, body: dict, retries: Optional[int] = None) -> Any:
        return self._request("POST", path, body, self.retries if retries is None else retries)

    def post_all(self, path: str, bodies: Sequence[dict]) -> list:
        """`post` every body, `concurrency` at a time; the answers in order. The first error
        is raised (requests not yet sent are dropped; those in flight end by their timeout)."""
        if len(bodies) <= 1 or self.concurrency == 1:
            return [self.post(path, b) for b in bodies]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies)), thread_name_prefix="teacher-http")
        try:
            return list(pool.map(lambda b: self.post(path, b), bodies))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _request(self, method: str, path: str, body: Optional[dict], retries: int) -> Any:
        where = f"{method} {self.url}{path}"
        for attempt in range(retries + 1):
            try:
                return self._once(method, path, body, where)
            except _Retryable as e:
                if attempt == retries:
                    tries = f"after {retries + 1} attempts (teacher.retries={retries})" if retries else "no retry"
                    raise ServerError(f"teacher server: {where}: {e.reason}; {tries}", e.status) from None
                time.sleep(BACKOFF_S * 2 ** attempt)
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, body: Optional[dict], where: str) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self._headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}: {_detail(e)}"
            if e.code in RETRY_STATUSES:
                raise _Retryable(reason, e.code) from None
            raise ServerError(f"teacher server: {where} answered {reason}", e.code) from None
        except TimeoutError:
            raise _Retryable(self._late()) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Retryable(self._late()) from None
            raise _Retryable(f"cannot connect ({e.reason})") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"the connection failed ({type(e).__name__}: {e})") from None
        if not raw.strip():
            return None  # /health answers 200 with no body
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"teacher server: {where} answered with something that is not JSON: "
                              f"{raw[:200]!r}", 200) from None

    def _late(self) -> str:
        return f"no answer within {self.timeout_s:g}s (teacher.request_timeout_s)"


def _detail(err: urllib.error.HTTPError) -> str:
    """The server's own words on an error answer (vLLM: {"error": {"message": ...}}), short."""
    try:
        raw = err.read()
    except Exception:  # noqa: BLE001 - an unreadable body leaves the status alone
        return "(no body)"
    try:
        msg = json.loads(raw)
        msg = msg.get("error", msg) if isinstance(msg, dict) else msg
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except ValueError:
        msg = raw.decode(errors="replace")
    return str(msg)[:300]
