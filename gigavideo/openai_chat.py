"""The client both OpenAI-compatible backends share: stage 1's LLM (`llm.py`) and stage 3's judge (`judge.py`)."""

from __future__ import annotations

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
from openai._constants import MAX_RETRY_AFTER_DELAY, MAX_RETRY_DELAY

log = logging.getLogger("gigavideo.openai_chat")


class _RetryingOpenAI(openai.OpenAI):
    """The openai client, whose first retry waits `backoff` seconds (then doubling, up to the client's cap).

    The client's own retry loop decides what to retry (408, 409, 429, 5xx, timeouts, dropped connections)
    and honours the server's Retry-After; only the base of its exponential backoff is ours to set.
    """

    backoff = 1.0

    def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None) -> float:
        retry_after = self._parse_retry_after_header(response_headers)
        if retry_after is not None and 0 < retry_after <= MAX_RETRY_AFTER_DELAY:
            return retry_after
        attempt = options.get_max_retries(self.max_retries) - remaining_retries
        return min(self.backoff * 2.0**attempt, MAX_RETRY_DELAY) * (1 - 0.25 * random.random())


class ChatClient:
    """One openai client per process for an OpenAI-compatible server (vLLM, SGLang, ...).

    Its connection pool holds `concurrency` keep-alive connections, the most requests `map` has in flight,
    so thousands of requests reuse a handful of TCP connections. The API key is read from the environment
    variable `api_key_env` names and never logged; a server run without a key gets the placeholder "EMPTY".
    """

    def __init__(
        self, base_url: str, api_key_env: str, concurrency: int, timeout: float, max_retries: int, backoff: float
    ):
        self.base_url, self.concurrency, self.max_retries = base_url, int(concurrency), int(max_retries)
        limits = httpx2.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self.client = _RetryingOpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            timeout=float(timeout),
            max_retries=self.max_retries,
            http_client=openai.DefaultHttpxClient(limits=limits, timeout=float(timeout)),
        )
        self.client.backoff = float(backoff)
        self.last_error: str | None = None  # why the latest request that got no answer failed (for the stage's error)

    def map(self, fn, items: list) -> list:
        """fn over items, `concurrency` at a time (the pool's size), in order."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    def create(self, what: str, **body) -> dict | None:
        """The chat completion as a dict, or None once the retries are spent (or on an error not worth retrying)."""
        try:
            return self.client.chat.completions.create(**body).to_dict()
        except openai.APIStatusError as err:
            self.last_error = f"{self.base_url} answered HTTP {err.status_code}"
            if err.status_code in RETRIED_STATUS:
                log.warning("%s request failed after %d retries (HTTP %d)", what, self.max_retries, err.status_code)
            else:
                log.error("%s answered %d for a %s request; not retried", self.base_url, err.status_code, what)
        except openai.APIConnectionError as err:
            cause = err.__cause__ or err
            self.last_error = f"no connection to {self.base_url} after {self.max_retries} retries ({cause})"
            log.warning("%s request failed after %d retries (%s)", what, self.max_retries, type(err).__name__)
        except openai.OpenAIError as err:  # an answer that is not a chat completion
            self.last_error = f"{self.base_url} gave an unusable answer ({type(err).__name__})"
            log.warning("%s: unusable answer to a %s request (%s)", self.base_url, what, type(err).__name__)
        return None


RETRIED_STATUS = {408, 409, 429} | set(range(500, 600))  # what the openai client retries
