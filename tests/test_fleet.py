"""A fleet of OpenAI-compatible servers: spread, bounded, retried elsewhere, counted per server.

Two or three of the scripted servers of tests/test_openai_backend.py run side by side; a broken
one answers 500, hangs past the client's timeout, or drops the connection without a reply. A
dead one is a port nobody listens on. Backoff waits are off, so the whole file takes seconds.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from tenacity import wait_none

from cai.backends.base import ScorePrompt, ServerCount, Usage
from cai.backends.openai import OpenAIBackend
from cai.backends.openai_fleet import FleetDownError
from cai.hashing import content_hash
from cai.manifest import StageManifest
from cai.sections import OpenAIEngine, SamplingParams
from cai.store import StageStore
from tests.test_openai_backend import FakeServer, Handler, chat

PARAMS = SamplingParams(max_new_tokens=5, seed=7, temperature=0.7)


class FleetHandler(Handler):
    server: FleetServer

    def do_POST(self) -> None:
        srv = self.server
        if srv.mode is None:
            return super().do_POST()
        self.rfile.read(int(self.headers["Content-Length"]))
        with srv.lock:
            srv.attempts["*"] += 1
        if srv.mode == "500":
            return self._send(500, {"error": {"message": "boom"}})
        if srv.mode == "hang":
            time.sleep(1.0)  # the client gave up after its timeout
            return self._send(200, {})
        self.close_connection = True  # "close": hang up without a reply


class FleetServer(FakeServer):
    def __init__(self, mode: str | None = None) -> None:
        super().__init__()
        self.RequestHandlerClass = FleetHandler
        self.mode = mode  # None (healthy), "500", "hang" or "close"


@pytest.fixture
def start():
    servers: list[FleetServer] = []

    def start(mode: str | None = None) -> FleetServer:
        srv = FleetServer(mode)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def dead_url() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def make(urls: str | list[str], **overrides) -> OpenAIBackend:
    config = OpenAIEngine(base_url=urls, **{"max_retries": 2, "timeout": 0.5, "concurrency": 4, **overrides})
    backend = OpenAIBackend("fake-model", config)
    backend.retry_wait = wait_none()
    return backend


def texts(backend: OpenAIBackend, prompts: list[str]) -> list[list[str]]:
    out = backend.generate([chat(p) for p in prompts], PARAMS)
    assert all(c.ok for c in out), [c.error for c in out]
    return [[s.text for s in c.samples] for c in out]


PROMPTS = [f"item {i}" for i in range(10)]


@pytest.mark.parametrize("mode", ["500", "hang", "close"])
def test_a_failing_server_is_routed_around_and_counted(start, mode):
    good, bad = start(), start(mode)
    backend = make([bad.url, good.url])  # the bad one first: it gets the first request
    alone = make(good.url)
    assert texts(backend, PROMPTS) == texts(alone, PROMPTS)  # seeds don't depend on the server
    counts = backend.servers
    assert counts[bad.url].failures == counts[bad.url].requests == bad.attempts["*"] >= 1
    assert counts[bad.url].retried_elsewhere == counts[bad.url].failures  # each went to the good one
    assert counts[good.url] == ServerCount(requests=len(PROMPTS))
    assert backend.usage.failed_items == 0


def test_every_server_gets_a_try_even_with_no_retries(start):
    good, bad = start(), start("500")
    backend = make([bad.url, good.url], max_retries=0, concurrency=1)
    assert texts(backend, ["one"]) == texts(make(good.url), ["one"])
    assert backend.servers[bad.url] == ServerCount(requests=1, failures=1, retried_elsewhere=1)


def test_healthy_servers_share_the_load_within_their_bound(start):
    first, second = start(), start()
    for srv in (first, second):
        srv.delay = 0.05
    backend = make([first.url, second.url], concurrency=4)
    alone = make(first.url)
    spread = texts(backend, PROMPTS)
    assert first.bodies and second.bodies  # both served
    assert max(first.max_in_flight, second.max_in_flight) <= 2  # ceil(4 / 2) each
    assert first.max_in_flight + second.max_in_flight > 2  # and more than one server's share at once
    assert spread == texts(alone, PROMPTS)
    assert sum(c.requests for c in backend.servers.values()) == len(PROMPTS)


def test_scoring_goes_around_a_broken_server(start):
    good, bad = start(), start("500")
    backend = make([bad.url, good.url])
    scores = backend.score_choices([ScorePrompt(chat=chat(f"q{i}")) for i in range(4)], ["A", "B"])
    assert all(s.ok for s in scores)
    assert backend.servers[bad.url].failures >= 1 and backend.servers[good.url].requests == 4


def test_a_request_at_fault_is_not_sent_elsewhere(start):
    first, second = start(), start()
    backend = make([first.url, second.url])
    out = backend.generate([chat("bad input"), chat("fine")], PARAMS)  # 400 from whichever server
    assert [c.ok for c in out] == [False, True] and "400" in out[0].error
    assert first.attempts["bad input"] + second.attempts["bad input"] == 1
    assert sum(c.retried_elsewhere for c in backend.servers.values()) == 0


def test_a_fleet_that_is_all_down_raises_naming_every_server(start):
    broken, dead = start("500"), dead_url()
    backend = make([broken.url, dead], max_retries=3)
    started = time.monotonic()
    with pytest.raises(FleetDownError) as caught:
        backend.generate([chat(p) for p in PROMPTS[:3]], PARAMS)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert broken.url in message and dead in message and "last error" in message
    counts = backend.servers
    # every request: 4 attempts (1 + max_retries), at least one on each server
    assert counts[broken.url].requests + counts[dead].requests == 3 * 4
    assert counts[broken.url].requests >= 3 and counts[dead].requests >= 3
    assert counts[broken.url].failures == counts[broken.url].requests


def test_a_single_server_that_is_down_raises_too(start):
    broken = start("500")
    with pytest.raises(FleetDownError, match="boom"):
        make(broken.url, max_retries=1).generate([chat("a"), chat("b")], PARAMS)
    assert broken.attempts["*"] == 2 * 2


def test_committed_chunks_survive_a_fleet_going_down(start, tmp_path):
    good = start()
    backend = make([good.url, dead_url()])
    config = {"engine": backend.config.model_dump(mode="json")}
    with StageStore(tmp_path, "sl", config, upstream={}) as store:
        before = backend.usage.model_copy()
        out = backend.generate([chat("one"), chat("two")], PARAMS)
        store.commit(
            [{"row_id": f"r{i}", "text": c.text} for i, c in enumerate(out)],
            usage=backend.usage.minus(before),
        )
        good.mode = "500"
        with pytest.raises(FleetDownError):
            backend.generate([chat("three")], PARAMS)
    with StageStore(tmp_path, "sl", config, upstream={}) as store:
        assert store.committed() == {"r0", "r1"}
    manifest = StageManifest.model_validate_json((store.path / "manifest.json").read_bytes())
    assert manifest.servers[good.url]["requests"] >= 2 and manifest.servers[good.url]["failures"] == 0
    assert (
        sum(s["requests"] for s in manifest.servers.values())
        == sum(s["failures"] for s in manifest.servers.values()) + 2
    )


def test_usage_differences_keep_per_server_counts():
    before = Usage(per_server={"a": ServerCount(requests=2, failures=1)})
    after = Usage(
        generate_calls=1, per_server={"a": ServerCount(requests=5, failures=1), "b": ServerCount(requests=1)}
    )
    delta = after.minus(before)
    assert delta.per_server == {"a": ServerCount(requests=3), "b": ServerCount(requests=1)}
    assert delta.generate_calls == 1
    assert before.plus(delta).per_server == after.per_server
    assert "per_server" not in after.counts()


def test_a_single_url_dumps_and_keys_as_before():
    url = "http://127.0.0.1:8000/v1"
    dump = OpenAIEngine(base_url=url).model_dump(mode="json")
    # the engine section as it was dumped before fleets: stage keys of existing runs are unchanged
    assert dump == {
        "kind": "openai",
        "base_url": url,
        "api_key_env": "OPENAI_API_KEY",
        "concurrency": 8,
        "max_retries": 5,
        "timeout": 120.0,
        "top_logprobs": 20,
        "continue_final_message": True,
    }
    fleet = OpenAIEngine(base_url=[url, "http://h2:8000/v1"])
    assert fleet.model_dump(mode="json")["base_url"] == [url, "http://h2:8000/v1"]
    assert content_hash(fleet.model_dump(mode="json")) != content_hash(dump)
    assert OpenAIEngine(base_url=url).urls == [url]


@pytest.mark.parametrize("urls", [[], ["http://a/v1", "http://a/v1"]])
def test_a_fleet_list_must_be_non_empty_and_distinct(urls):
    with pytest.raises(ValueError, match="each URL once"):
        OpenAIEngine(base_url=urls)


def test_the_readme_fleet_example_validates():
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("engine: {kind: openai, base_url: ["))
    engine = OpenAIEngine.model_validate(yaml.safe_load(line)["engine"])
    assert engine.urls == ["http://h1:8000/v1", "http://h2:8000/v1"]
    backend = OpenAIBackend("m", engine, client=type("Client", (), {"close": lambda self: None})())
    assert backend.fleet.cap == 32  # "at most 64 in flight, 32 on each server", as the README says
