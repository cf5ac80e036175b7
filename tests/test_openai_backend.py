"""The OpenAI backend against a scripted local server: retries, concurrency, failures, scoring.

A stdlib HTTP server on 127.0.0.1 speaks just enough of the chat-completions API. What it does
depends on the last user message, so one batch can mix healthy, flaky and broken items:
  "flaky"  -> 429 on the first attempt, then 200      "broken" -> always 500
  "slow"   -> answers after the client's timeout      "bad"    -> 400 (not retried)
The real server (`vllm serve`) is exercised by tests/test_backend_contract.py.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tenacity import wait_none

from cai.backends.base import ScorePrompt
from cai.backends.openai import FLOOR_OFFSET, OpenAIBackend, option_logprobs
from cai.sections import OpenAIEngine, SamplingParams

TOP = [("A", -0.2), ("B", -1.9), (" A", -3.0), ("The", -4.0)]


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.attempts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0  # seconds every request takes (to observe concurrency)
        self.top = TOP
        self.token_counts: dict[str, int] | None = None  # /tokenize answers; None = 404

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        if self.path == "/tokenize":
            if srv.token_counts is None:
                return self._send(404, {"detail": "Not Found"})
            count = srv.token_counts.get(body["prompt"], 1)
            return self._send(200, {"tokens": list(range(count)), "count": count})
        last_user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
        with srv.lock:
            srv.bodies.append(body)
            srv.attempts[last_user] += 1
            attempt = srv.attempts[last_user]
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            time.sleep(srv.delay)
            if "flaky" in last_user and attempt == 1:
                return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
            if "broken" in last_user:
                return self._send(500, {"error": {"message": "boom"}})
            if "bad" in last_user:
                return self._send(400, {"error": {"message": "prompt too long"}})
            if "slow" in last_user:
                time.sleep(1.5)
            self._send(200, self._reply(body, last_user))
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _reply(self, body: dict, last_user: str) -> dict:
        n = body.get("n", 1)
        choices = []
        for k in range(n):
            choice = {
                "index": k,
                "finish_reason": "stop" if body.get("stop") else "length",
                "message": {"role": "assistant", "content": f" echo {last_user} #{k} {body.get('seed')} "},
            }
            if body.get("logprobs"):
                top = self.server.top[: body.get("top_logprobs", 0)]
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": top[0][0],
                            "logprob": top[0][1],
                            "bytes": None,
                            "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top],
                        }
                    ]
                }
            choices.append(choice)
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 5 * n,
                "total_tokens": prompt_tokens + 5 * n,
                "prompt_tokens_details": {"cached_tokens": 3},
            },
        }


@pytest.fixture
def server():
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def make(server: FakeServer, **overrides) -> OpenAIBackend:
    config = OpenAIEngine(base_url=server.url, **{"max_retries": 2, "timeout": 0.5, **overrides})
    backend = OpenAIBackend("fake-model", config)
    backend.retry_wait = wait_none()  # retries without sleeping; the backoff has its own test
    return backend


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_429_is_retried_and_the_batch_stays_aligned(server):
    backend = make(server)
    prompts = ["one", "flaky two", "three"]
    out = backend.generate([chat(p) for p in prompts], SamplingParams(max_new_tokens=5))
    assert [c.ok for c in out] == [True, True, True]
    assert [c.text.split()[1] for c in out] == ["one", "flaky", "three"]
    assert server.attempts["flaky two"] == 2 and server.attempts["one"] == 1


def test_a_request_that_keeps_failing_fails_only_its_item(server):
    backend = make(server)
    prompts = ["one", "broken", "bad", "four"]
    out = backend.generate([chat(p) for p in prompts], SamplingParams(max_new_tokens=5))
    assert [c.ok for c in out] == [True, False, False, True]
    assert "500" in out[1].error and "boom" in out[1].error
    assert "400" in out[2].error
    assert server.attempts["broken"] == 3  # 1 + max_retries
    assert server.attempts["bad"] == 1  # a client error is not retried
    assert backend.usage.failed_items == 2


def test_a_timeout_is_retried_then_fails_its_item(server):
    backend = make(server, max_retries=1, timeout=0.3)
    out = backend.generate([chat("slow"), chat("fast")], SamplingParams(max_new_tokens=5))
    assert not out[0].ok and "Timeout" in out[0].error
    assert out[1].ok
    assert server.attempts["slow"] == 2


def test_backoff_grows_and_honours_retry_after():
    from types import SimpleNamespace

    backend = OpenAIBackend("m", OpenAIEngine(), client=SimpleNamespace(close=lambda: None))
    waits = []
    for attempt in range(1, 7):
        state = SimpleNamespace(attempt_number=attempt, outcome=None)
        waits.append(max(backend._backoff(state) for _ in range(200)))
    assert waits[0] <= 0.5 and waits[-1] > 4 * waits[0]  # jittered, but the ceiling doubles

    class Response:
        headers = {"retry-after": "2.5"}

    failed = SimpleNamespace(exception=lambda: SimpleNamespace(response=Response()))
    assert backend._backoff(SimpleNamespace(attempt_number=1, outcome=failed)) == 2.5


def test_concurrency_is_bounded(server):
    server.delay = 0.15
    backend = make(server, concurrency=3)
    out = backend.generate([chat(f"item {i}") for i in range(10)], SamplingParams(max_new_tokens=5))
    assert all(c.ok for c in out)
    assert server.max_in_flight == 3


def test_sampling_fields_n_seeds_and_usage(server):
    backend = make(server)
    params = SamplingParams(max_new_tokens=7, n=2, seed=11, stop=["\n"], temperature=0.5, top_p=0.9)
    out = backend.generate([chat("a"), chat("b")], params)
    assert [len(c.samples) for c in out] == [2, 2]
    assert all(s.finish_reason == "stop" for c in out for s in c.samples)
    first, second = sorted(server.bodies, key=lambda b: b["messages"][0]["content"])
    assert first["max_tokens"] == 7 and first["n"] == 2 and first["stop"] == ["\n"] and first["top_p"] == 0.9
    assert first["seed"] != second["seed"]  # one seed per item, so batch composition doesn't matter
    assert "repetition_penalty" not in first  # only sent when asked for
    backend.generate([chat("a")], params)
    assert server.bodies[-1]["seed"] == first["seed"]  # same seed and index, same request seed
    assert backend.usage.generate_calls == 2
    assert backend.usage.completion_tokens == 3 * 10  # 5 tokens per choice, from the server's usage
    assert backend.usage.prompt_tokens == 3


def test_repetition_penalty_is_sent_as_an_extension(server):
    backend = make(server)
    backend.generate([chat("a")], SamplingParams(max_new_tokens=3, repetition_penalty=1.3))
    assert server.bodies[0]["repetition_penalty"] == 1.3


def test_options_map_to_top_logprobs():
    values, floored = option_logprobs(["A", "B"], TOP)
    assert values == [-0.2, -1.9] and floored == 0
    # stripped match when the exact text is absent; floor below the lowest when missing
    values, floored = option_logprobs([" B", "C"], TOP)
    assert values[0] == -1.9
    assert values[1] == pytest.approx(-4.0 + FLOOR_OFFSET) and floored == 1


def test_scoring_sends_the_prefix_as_a_partial_assistant_turn(server):
    backend = make(server, top_logprobs=5)
    prompts = [ScorePrompt(chat=chat("which?"), assistant_prefix="The answer is: (")] * 2
    scores = backend.score_choices(prompts, ["A", "B"])
    body = server.bodies[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "The answer is: ("}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 5
    for s in scores:
        assert s.ok
        assert sum(s.probs) == pytest.approx(1.0)
        assert s.probs[0] == pytest.approx(1 / (1 + math.exp(-1.7)))
        assert s.cached_tokens == 3
    assert backend.usage.score_calls == 1 and backend.usage.cached_tokens == 6
    assert backend.usage.floored_logprobs == 0


def test_scoring_without_continue_final_message_appends_to_the_user_turn(server):
    backend = make(server, continue_final_message=False)
    backend.score_choices([ScorePrompt(chat=chat("which?"), assistant_prefix="The answer is: (")], ["A", "B"])
    body = server.bodies[0]
    assert body["messages"] == [{"role": "user", "content": "which?\n\nThe answer is: ("}]
    assert "continue_final_message" not in body


def test_scoring_failures_and_floors_are_per_item(server):
    server.top = [("A", -0.1), ("x", -5.0)]
    backend = make(server)
    prompts = [ScorePrompt(chat=chat(t)) for t in ("fine", "broken", "flaky")]
    scores = backend.score_choices(prompts, ["A", "B"])
    assert [s.ok for s in scores] == [True, False, True]
    assert scores[1].options == ["A", "B"] and "500" in scores[1].error
    assert scores[0].logprobs[1] == pytest.approx(-5.0 + FLOOR_OFFSET)
    assert backend.usage.floored_logprobs == 2 and backend.usage.failed_items == 1


def test_multi_token_options_are_refused(server):
    backend = make(server)
    with pytest.raises(ValueError, match="single-token"):
        backend.score_choices([ScorePrompt(chat=chat("q"))], ["Yes", "No way"])  # no /tokenize: heuristic
    server.token_counts = {"Maybe": 2}
    backend = make(server)
    with pytest.raises(ValueError, match="'Maybe' is 2 tokens"):
        backend.score_choices([ScorePrompt(chat=chat("q"))], ["Yes", "Maybe"])
    assert server.bodies == []  # refused before any request was sent
