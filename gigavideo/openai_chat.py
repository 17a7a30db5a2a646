"""The client both OpenAI-compatible backends share: stage 1's LLM (`llm.py`) and stage 3's judge (`judge.py`).

Every answer of the server is hostile input: a request has a total deadline (a server that drips its answer a
byte at a time is cut off), an answer is read up to a bounded size, and a body that is not a chat completion of
the expected types is that request's failure, retried as set and then named. A stop (SIGTERM) does not wait for
requests in flight.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.parse

from gigavideo.errors import ConfigError

log = logging.getLogger("gigavideo.openai_chat")

MAX_ANSWER_BYTES = 16 * 2**20  # a chat completion with 20 logprobs, or an LLM's prompts, is a few KB
RETRY_AFTER_CAP_S = 60.0  # a server's Retry-After is honoured up to this
BACKOFF_CAP_S = 8.0
RETRIED_STATUS = {408, 409, 429} | set(range(500, 600))


class MalformedAnswer(ValueError):
    """A 200 answer that is not what was asked for (not JSON, a field of another type): retried, then named."""


class Stopping(Exception):
    """The stage is stopping (SIGTERM): requests in flight are abandoned."""


class ChatClient:
    """One client per process for an OpenAI-compatible server (vLLM, SGLang, ...), on the standard library's HTTP.

    Each of the `concurrency` workers of `map` keeps one keep-alive connection, so thousands of requests reuse a
    handful of TCP connections. `timeout` bounds each request whole (connect, headers, body; each retry anew): at
    the deadline its socket is shut down, which ends any read at once. The API key is read from the environment
    variable `api_key_env` names and never logged; a server run without a key gets the placeholder "EMPTY".
    """

    def __init__(
        self, base_url: str, api_key_env: str, concurrency: int, timeout: float, max_retries: int, backoff: float
    ):
        self.base_url, self.concurrency, self.max_retries = base_url.rstrip("/"), int(concurrency), int(max_retries)
        self.timeout, self.backoff = float(timeout), float(backoff)
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"{base_url!r} is not an http(s) URL of a server")
        self.url = url
        self.headers = {
            "Authorization": f"Bearer {os.environ.get(api_key_env) or 'EMPTY'}",
            "Content-Type": "application/json",
        }
        self.stopping = threading.Event()
        self.local = threading.local()  # each worker's connection
        self.in_flight: set[http.client.HTTPConnection] = set()
        self.lock = threading.Lock()
        self.last_error: str | None = None  # why the latest request that got no answer failed (for the stage's error)

    def map(self, fn, items: list) -> list:
        """fn over items, `concurrency` at a time, in order. The workers are daemon threads and the caller waits
        on them in short slices, so that a signal (SIGTERM) stops the stage at once instead of after them."""
        results, errors, queue = [None] * len(items), [], iter(enumerate(items))

        def work():
            while not self.stopping.is_set() and not errors:
                with self.lock:
                    index, item = next(queue, (None, None))
                if index is None:
                    return
                try:
                    results[index] = fn(item)
                except Stopping:
                    return
                except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
                    errors.append(err)  # the other workers take no new item

        threads = [threading.Thread(target=work, daemon=True) for _ in range(min(self.concurrency, len(items)))]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except BaseException:
            self.stop()
            raise
        if errors:
            raise errors[0]
        return results

    def stop(self) -> None:
        """Requests in flight end now (their sockets are shut down); no new one starts."""
        self.stopping.set()
        with self.lock:
            for conn in list(self.in_flight):
                _shut(conn)

    def create(self, what: str, parse=None, **body):
        """The chat completion, through `parse(dict)` if given (which raises MalformedAnswer for an answer of the
        wrong shape), or None once the retries are spent or on an error not worth retrying."""
        for attempt in range(self.max_retries + 1):
            if self.stopping.is_set():
                raise Stopping
            delay = min(self.backoff * 2.0**attempt, BACKOFF_CAP_S)
            try:
                status, headers, data = self._post(body)
                if status == 200:
                    answer = decode_answer(data, headers)
                    return parse(answer) if parse is not None else answer
                self.last_error = f"{self.base_url} answered HTTP {status}"
                if status not in RETRIED_STATUS:
                    log.error("%s answered %d for a %s request; not retried", self.base_url, status, what)
                    return None
                delay = retry_after(headers) or delay
            except MalformedAnswer as err:
                self.last_error = f"{self.base_url} gave an unusable answer ({err})"
            except (OSError, http.client.HTTPException) as err:
                if self.stopping.is_set():
                    raise Stopping from None
                self.last_error = f"no answer from {self.base_url} ({type(err).__name__}: {str(err)[:200]})"
            if attempt == self.max_retries:
                break
            if self.stopping.wait(delay * (1 - 0.25 * random.random())):
                raise Stopping
        log.warning("%s request failed after %d retries: %s", what, self.max_retries, self.last_error)
        return None

    def _post(self, body: dict) -> tuple[int, dict, bytes]:
        """POST the request on this worker's connection; the whole exchange within `timeout` seconds."""
        conn, reused = getattr(self.local, "conn", None), True
        if conn is None:
            kind = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
            conn, reused = kind(self.url.hostname, self.url.port, timeout=self.timeout), False
            self.local.conn = conn
        expired = threading.Event()
        timer = threading.Timer(self.timeout, lambda: (expired.set(), _shut(conn)))
        timer.daemon = True
        with self.lock:
            self.in_flight.add(conn)
        timer.start()
        try:
            answer = self._exchange(conn, body, reused)
            if expired.is_set():  # the shut-down socket read as the end of the answer
                raise TimeoutError
            return answer
        except (OSError, http.client.HTTPException, MalformedAnswer):
            conn.close()  # what is left of the answer must not be read as the next one's
            self.local.conn = None
            if expired.is_set():
                raise TimeoutError(f"no complete answer within --timeout = {self.timeout:g} s") from None
            raise
        finally:
            timer.cancel()
            with self.lock:
                self.in_flight.discard(conn)

    def _exchange(self, conn, body: dict, reused: bool) -> tuple[int, dict, bytes]:
        payload = json.dumps(body).encode()
        try:
            conn.request("POST", f"{self.url.path}/chat/completions", body=payload, headers=self.headers)
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            if not reused:
                raise
            conn.close()  # a keep-alive connection the server had closed: once more on a new one
            conn.request("POST", f"{self.url.path}/chat/completions", body=payload, headers=self.headers)
            response = conn.getresponse()
        declared = response.getheader("content-length", "")
        if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
            raise MalformedAnswer(f"an answer of {int(declared)} bytes, over the {MAX_ANSWER_BYTES} read")
        chunks, size = [], 0
        while chunk := response.read(2**16):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise MalformedAnswer(f"an answer over the {MAX_ANSWER_BYTES} bytes read")
            chunks.append(chunk)
        if declared.isdigit() and size < int(declared):
            raise http.client.IncompleteRead(b"", int(declared) - size)
        return response.status, {k.lower(): v for k, v in response.getheaders()}, b"".join(chunks)


def _shut(conn: http.client.HTTPConnection) -> None:
    """End a connection's reads and writes now, from any thread."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def decode_answer(data: bytes, headers: dict) -> dict:
    try:
        answer = json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        kind = headers.get("content-type", "no content type")
        raise MalformedAnswer(f"a body that is not JSON ({kind}, {len(data)} bytes: {err})") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
        raise MalformedAnswer(f"JSON that is not a chat completion: {str(answer)[:120]}")
    return answer


def retry_after(headers: dict) -> float | None:
    """A server's Retry-After (seconds or an HTTP date), where it is one worth waiting for."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return seconds if 0 < seconds <= RETRY_AFTER_CAP_S else None
