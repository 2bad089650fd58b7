"""A minimal client for OpenAI-compatible ``/chat/completions`` endpoints, on the standard library only.

Works with a hosted API or a local server (vLLM, llama.cpp, Ollama, LM Studio, ...). Pictures travel as
``image_url`` content parts holding ``data:image/png;base64,...`` URLs.

Failures that may pass (HTTP 408/409/429/5xx, timeouts, dropped connections, a reply that is not valid
JSON) are retried with exponential backoff and jitter, waiting at least as long as a ``Retry-After``
header asks. Other 4xx answers are not retried: they raise :class:`ChatError` naming the status at once.

The API key goes only into the ``Authorization`` header; it is scrubbed from every error message.

Why not the ``openai`` package: its retries cover the HTTP errors alone, and the judge must also retry a 200
whose body is not a chat completion (local servers send those), say a refused connection at once before any
answer, and keep the key out of every message; those are most of this file, so it would wrap, not replace, it.
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional

from PIL import Image

log = logging.getLogger("seedstory.eval")

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
MAX_RETRY_AFTER = 600.0  # never sleep longer than this for one Retry-After
ERROR_BODY_CHARS = 500


class ChatError(RuntimeError):
    """A chat request that failed for good. ``status`` is the HTTP status (None: no HTTP answer)."""

    def __init__(self, message: str, status: Optional[int] = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class _Retry(Exception):
    def __init__(self, message: str, status: Optional[int] = None, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def image_data_url(image: Image.Image, max_side: int = 0) -> str:
    """A PNG ``data:`` URL for ``image``, shrunk so its longer side is at most ``max_side`` (0: as is)."""
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(image: Image.Image, max_side: int = 0) -> dict:
    return {"type": "image_url", "image_url": {"url": image_data_url(image, max_side)}}


def chat_url(base_url: str) -> str:
    """``https://api.openai.com/v1`` -> ``.../v1/chat/completions``; a full endpoint URL is kept."""
    base = base_url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"the base URL must start with http:// or https://, got {redact_url(base)!r}")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def redact_url(url: str) -> str:
    """The URL without any user:password part (safe to print and to store)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/odd."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


class ChatClient:
    """``complete(messages) -> reply text`` against one model on one endpoint.

    ``backoff`` is the first retry's base delay in seconds; attempt ``k`` waits about
    ``min(max_backoff, backoff * 2**k)`` times a random factor in [0.5, 1] (and at least ``Retry-After``).
    Thread-safe: each call opens its own connection.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Optional[str] = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 2.0,
        max_backoff: float = 60.0,
        temperature: Optional[float] = 0.3,
        max_tokens: Optional[int] = 1024,
        extra_body: Optional[dict] = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: Optional[random.Random] = None,
    ):
        self.url = chat_url(base_url)
        self.model = model
        self._api_key = api_key or None
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(0.0, float(max_backoff))
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.requests = 0  # HTTP requests sent (retries included)
        # Until the server has answered once, a refused connection or an unknown host is a wrong address or a
        # server that is not running: said at once instead of after minutes of retries.
        self.reached = False

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(url={redact_url(self.url)!r}, model={self.model!r}, key={'set' if self._api_key else 'none'})"

    # -- public ----------------------------------------------------------------------------------
    def complete(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens:
            body["max_tokens"] = int(self.max_tokens)
        body.update(self.extra_body)
        data = json.dumps(body).encode("utf-8")
        attempt = 0
        while True:
            try:
                return self._once(data)
            except _Retry as e:
                if attempt >= self.max_retries:
                    raise ChatError(f"{e} (gave up after {attempt + 1} attempts)", status=e.status,
                                    retryable=True) from None
                delay = self.delay(attempt, e.retry_after)
                log.warning("judge request failed: %s; retrying in %.1f s (attempt %d of %d)", e, delay,
                            attempt + 2, self.max_retries + 1)
                self._sleep(delay)
                attempt += 1

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        base = min(self.max_backoff, self.backoff * (2 ** attempt))
        wait = base * self._rng.uniform(0.5, 1.0)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return wait

    # -- one request ---------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return text

    def _once(self, data: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "seedstory-eval/1"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self.reached = True
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as e:
            self.reached = True
            try:
                detail = e.read()[:ERROR_BODY_CHARS * 4].decode("utf-8", "replace")
            except Exception:  # the error body itself may be cut off
                detail = ""
            finally:
                e.close()
            detail = self._scrub(" ".join(detail.split()))[:ERROR_BODY_CHARS]
            message = f"HTTP {e.code} {e.reason} from {redact_url(self.url)}" + (f": {detail}" if detail else "")
            if e.code in RETRY_STATUSES:
                raise _Retry(message, e.code, parse_retry_after(e.headers.get("Retry-After") if e.headers else None))
            hint = {401: " (check the API key variable)", 403: " (the key may lack access to this model)",
                    404: " (check --base-url and --model)", 413: " (request too large: try --max-image-side or --max-frames)"}
            raise ChatError(message + hint.get(e.code, ""), status=e.code) from None
        except (TimeoutError, socket.timeout):
            raise _Retry(f"no answer from {redact_url(self.url)} within {self.timeout:g} s") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retry(f"no answer from {redact_url(self.url)} within {self.timeout:g} s") from None
            if isinstance(reason, OSError):
                message = f"cannot reach {redact_url(self.url)}: {self._scrub(str(reason))}"
                if not self.reached and isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
                    raise ChatError(message + " (is the server running? check --base-url)") from None
                raise _Retry(message) from None
            raise ChatError(f"cannot reach {redact_url(self.url)}: {self._scrub(str(reason))}") from None
        except (http.client.HTTPException, ConnectionError, OSError) as e:
            raise _Retry(f"connection to {redact_url(self.url)} failed: {type(e).__name__}: {self._scrub(str(e))}") from None
        return self._content(raw, status)

    def _content(self, raw: bytes, status: int) -> str:
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            snippet = self._scrub(" ".join(raw[:200].decode("utf-8", "replace").split()))
            raise _Retry(f"HTTP {status} with a body that is not JSON: {snippet!r}", status) from None
        if isinstance(payload, dict) and payload.get("error"):
            err = payload["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise _Retry(f"the server returned an error in a {status} answer: {self._scrub(str(msg))[:ERROR_BODY_CHARS]}",
                         status)
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            snippet = self._scrub(json.dumps(payload)[:200])
            raise _Retry(f"HTTP {status} answer is not a chat completion: {snippet}", status) from None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _Retry(f"HTTP {status} answer has content of type {type(content).__name__}", status)
        return self._scrub(content)  # a reply that repeats the key must not carry it into the results
