"""``python -m seedstory.eval judge`` against a local HTTP server speaking the chat-completions protocol.

The server is scripted per test: well-formed answers, replies without a verdict, 429/500 errors, a
timeout, malformed JSON, hard failures; the client's backoff is made tiny so everything runs fast.
"""
import json
import os
import re
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from seedstory.eval.__main__ import main
from seedstory.eval.client import ChatClient, ChatError, parse_retry_after
from seedstory.eval.judge import (
    ASPECTS,
    combine_orders,
    discover_stories,
    judge_pairwise,
    judge_stories,
    load_frames,
    mean_ci,
    parse_preference,
    parse_score,
    score_messages,
    summarize_pairwise,
    summarize_scores,
    t_quantile,
)
from seedstory.storage import save_story
from seedstory.story import Frame, StoryTree

SECRET = "sk-test-DO-NOT-LEAK-7f3a9c2e"
FAST = ["--backoff", "0.001", "--max-backoff", "0.01", "--no-progress"]


# -- a scripted chat-completions server -----------------------------------------------------------------
def completion(text):
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class Reply:
    """What the server does with one request."""

    def __init__(self, status=200, body=None, headers=None, delay=0.0, raw=None):
        self.status, self.body, self.headers, self.delay, self.raw = status, body, headers or {}, delay, raw


def ok(text, delay=0.0):
    return Reply(200, completion(text), delay=delay)


class FakeJudge:
    def __init__(self, responder):
        self.responder = responder  # (index, request) -> Reply
        self.requests = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    def answer(self, request):
        with self.lock:
            index = len(self.requests)
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self.responder(index, request)
        finally:
            with self.lock:
                self.in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            payload = json.loads(body)
        except json.JSONDecodeError:
            payload = None
        request = {"path": self.path, "headers": dict(self.headers), "json": payload}
        reply = self.server.fake.answer(request)
        if reply.delay:
            time.sleep(reply.delay)
        data = reply.raw if reply.raw is not None else json.dumps(reply.body if reply.body is not None else {}).encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


@contextmanager
def serve(responder):
    fake = FakeJudge(responder)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


# -- what the judge sees --------------------------------------------------------------------------------------
def texts(request):
    parts = request["json"]["messages"][-1]["content"]
    return [p["text"] for p in parts if p["type"] == "text"]


def images(request):
    parts = request["json"]["messages"][-1]["content"]
    return [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]


def aspect_of(request):
    instruction = texts(request)[-1]
    for aspect, word in (("style", "image style consistency"), ("engaging", "engagement"),
                         ("coherence", "text-image coherence")):
        if f"one aspect only: {word}" in instruction:
            return aspect
    raise AssertionError("no aspect in the instruction")


def wanted_score(request):
    """The stories below say which score they want in their first text."""
    return int(re.search(r"score=(\d+)", " ".join(texts(request))).group(1))


def scoring(index, request):
    return ok(f"The pictures look fine. Final rating: [[{wanted_score(request)}]]")


def make_story(path, texts_, color=(200, 30, 30), size=(40, 32), zip_=False):
    tree = StoryTree()
    parent = None
    for i, text in enumerate(texts_):
        image = Image.new("RGB", size, tuple((c + 37 * i) % 256 for c in color))
        frame = tree.add(Frame(id=tree.new_id(), parent=parent, text=text, image=image,
                               origin="opening" if parent is None else "generated"))
        parent = frame.id
    return save_story(tree, str(path) + (".zip" if zip_ else ""))


@pytest.fixture
def stories(tmp_path):
    root = tmp_path / "stories"
    make_story(root / "s1", ["score=6 A fox finds a key.", "The fox opens a door.", "Behind it, a garden."])
    make_story(root / "s2", ["score=8 A girl builds a kite.", "The wind lifts it."])
    make_story(root / "s3", ["score=9 A robot learns to paint.", "It paints the sea."], zip_=True)
    return root


def judge_args(fake, stories_dir, out, *extra):
    return ["judge", "--stories", str(stories_dir), "--base-url", fake.url, "--model", "judge-1", "--out", str(out),
            *FAST, *extra]


def read_results(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# -- verdicts and statistics -------------------------------------------------------------------------------------
def test_parse_score():
    assert parse_score("Good.\n[[7]]") == 7
    assert parse_score("rating: [[ 8 ]]") == 8
    assert parse_score("[[7/10]]") == 7
    assert parse_score("[[7.5]]") == 7.5
    assert parse_score("write it as [[N]]; my rating is [[4]]") == 4
    assert parse_score("first [[3]] then, on reflection, [[5]]") == 5  # the last verdict counts
    assert parse_score("[[11]]") is None and parse_score("[[0]]") is None
    assert parse_score("7 out of 10") is None and parse_score("") is None and parse_score(None) is None


def test_parse_preference():
    assert parse_preference("... [[A]]") == "A"
    assert parse_preference("... [[b]]") == "B"
    assert parse_preference("[[tie]]") == "tie" and parse_preference("[[C]]") == "tie"
    assert parse_preference("[[Story B]]") == "B"
    assert parse_preference("Use [[A]], [[B]] or [[tie]]. Verdict: [[B]]") == "B"
    assert parse_preference("A is better") is None and parse_preference(None) is None


def test_t_quantiles_and_ci_on_known_numbers():
    for df, expected in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (10, 2.2281), (30, 2.0423), (200, 1.9719),
                         (5000, 1.9604)]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)
    assert t_quantile(0.995, 5) == pytest.approx(4.0321, abs=2e-4)
    stats = mean_ci([6, 7, 8, 9])
    assert stats["n"] == 4 and stats["mean"] == pytest.approx(7.5)
    assert stats["sd"] == pytest.approx(1.290994, abs=1e-6)
    half = 3.182446 * 1.290994 / 2
    assert stats["ci_low"] == pytest.approx(7.5 - half, abs=1e-4) and stats["ci_high"] == pytest.approx(7.5 + half, abs=1e-4)
    assert mean_ci([5])["mean"] == 5 and mean_ci([5])["ci_low"] is None
    assert mean_ci([])["mean"] is None


def test_summary_math_on_known_records():
    records = [{"aspect": "style", "status": "ok", "score": s} for s in (6, 7, 8, 9)]
    records += [{"aspect": "style", "status": "failed", "score": None},
                {"aspect": "engaging", "status": "ok", "score": 3}]
    s = summarize_scores(records)
    assert s["style"]["n"] == 4 and s["style"]["mean"] == pytest.approx(7.5) and s["style"]["failed"] == 1
    assert s["style"]["ci_high"] - s["style"]["ci_low"] == pytest.approx(2 * 3.182446 * 1.290994 / 2, abs=1e-4)
    assert s["engaging"]["n"] == 1 and s["engaging"]["mean"] == 3
    assert s["coherence"]["n"] == 0 and s["coherence"]["mean"] is None


def test_combining_orders():
    assert combine_orders("a", "a") == "win" and combine_orders("b", "b") == "loss"
    assert combine_orders("a", "b") == "tie" and combine_orders("b", "a") == "tie"
    assert combine_orders("a", "tie") == "win" and combine_orders("tie", "b") == "loss"
    assert combine_orders("tie", "tie") == "tie" and combine_orders("a", None) is None
    recs = [{"status": "ok", "aspect": "style", "story": "x", "order": "ab", "winner": "a"},
            {"status": "ok", "aspect": "style", "story": "x", "order": "ba", "winner": "b"},
            {"status": "ok", "aspect": "style", "story": "y", "order": "ab", "winner": "a"},
            {"status": "ok", "aspect": "style", "story": "y", "order": "ba", "winner": "a"},
            {"status": "failed", "aspect": "style", "story": "z", "order": "ab", "winner": None}]
    s = summarize_pairwise(recs, ["style"])["style"]
    assert s["combined"]["n"] == 2 and s["combined"]["win"] == 1 and s["combined"]["tie"] == 1
    assert s["combined"]["consistent_rate"] == 0.5 and s["failed"] == 1
    # x: a shown first won (ab), b shown first won (ba); y: a first won (ab), a second won (ba) -> 3 of 4 firsts
    assert s["combined"]["first_shown_rate"] == 0.75
    assert s["per_order"]["ab"]["win_rate"] == 1.0 and s["per_order"]["ba"]["win_rate"] == 0.5


# -- the client ---------------------------------------------------------------------------------------------------
def test_client_sends_images_and_key_and_reads_the_reply(stories):
    with serve(lambda i, r: ok("fine [[7]]")) as fake:
        client = ChatClient(fake.url, "judge-1", api_key=SECRET, temperature=0.3, max_tokens=100)
        story = load_frames(str(stories / "s1"), "s1", max_image_side=16)
        reply = client.complete(score_messages(story, "style"))
    assert reply == "fine [[7]]"
    (req,) = fake.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = req["json"]
    assert body["model"] == "judge-1" and body["temperature"] == 0.3 and body["max_tokens"] == 100
    urls = images(req)
    assert len(urls) == 3 and all(u.startswith("data:image/png;base64,") for u in urls)
    import base64
    import io

    first = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert max(first.size) == 16  # shrunk to --max-image-side
    text = " ".join(texts(req))
    assert "A fox finds a key." in text and "The fox opens a door." in text and "[[N]]" in text
    assert "1 to 10" in text
    with serve(lambda i, r: ok("x")) as fake:
        ChatClient(fake.url + "/chat/completions", "m", api_key=None).complete([{"role": "user", "content": "hi"}])
    assert "Authorization" not in fake.requests[0]["headers"]
    assert fake.requests[0]["path"] == "/v1/chat/completions"


def test_429_then_success_waits_at_least_retry_after():
    waits = []
    with serve(lambda i, r: Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "3"}) if i < 2
               else ok("[[5]]")) as fake:
        client = ChatClient(fake.url, "m", max_retries=3, backoff=0.001, sleep=waits.append)
        assert client.complete([{"role": "user", "content": "hi"}]) == "[[5]]"
    assert len(fake.requests) == 3 and waits == [3.0, 3.0]  # honours Retry-After over the tiny backoff
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    assert parse_retry_after("100000") == 600.0  # capped


def test_backoff_grows_exponentially_with_jitter():
    client = ChatClient("http://127.0.0.1:9/v1", "m", backoff=1.0, max_backoff=8.0)
    for attempt, base in enumerate([1, 2, 4, 8, 8]):
        for _ in range(20):
            assert base * 0.5 <= client.delay(attempt) <= base
    assert client.delay(0, retry_after=5.0) >= 5.0


def test_500_then_success():
    waits = []
    with serve(lambda i, r: Reply(500, {"error": "boom"}) if i == 0 else Reply(503) if i == 1 else ok("[[6]]")) as fake:
        client = ChatClient(fake.url, "m", max_retries=2, backoff=0.001, sleep=waits.append)
        assert client.complete([{"role": "user", "content": "x"}]) == "[[6]]"
    assert len(fake.requests) == 3 and len(waits) == 2 and all(w <= 0.002 for w in waits)


def test_500_forever_gives_a_clear_error():
    with serve(lambda i, r: Reply(500, {"error": {"message": "internal"}})) as fake:
        client = ChatClient(fake.url, "m", max_retries=2, backoff=0.0001)
        with pytest.raises(ChatError, match=r"HTTP 500.*internal.*3 attempts") as e:
            client.complete([{"role": "user", "content": "x"}])
    assert e.value.status == 500 and len(fake.requests) == 3


def test_other_4xx_is_not_retried():
    with serve(lambda i, r: Reply(400, {"error": {"message": "image too large"}})) as fake:
        client = ChatClient(fake.url, "m", max_retries=5, backoff=0.0001)
        with pytest.raises(ChatError, match=r"HTTP 400.*image too large") as e:
            client.complete([{"role": "user", "content": "x"}])
    assert e.value.status == 400 and len(fake.requests) == 1


def test_timeout_then_success():
    with serve(lambda i, r: ok("[[9]]", delay=1.5 if i == 0 else 0)) as fake:
        client = ChatClient(fake.url, "m", timeout=0.3, max_retries=2, backoff=0.0001)
        started = time.time()
        assert client.complete([{"role": "user", "content": "x"}]) == "[[9]]"
    assert len(fake.requests) == 2 and time.time() - started < 1.4


def test_a_refused_connection_is_reported_at_once_then_retried_once_the_server_has_answered():
    """An address where nothing listens is a mistake to say now (it used to take 90 s of retries); a server that has
    answered and then drops the connection is retried, as a restart or a hiccup may pass."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    waits = []
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff=0.001, sleep=waits.append)
    with pytest.raises(ChatError, match="cannot reach .*is the server running") as e:
        client.complete([{"role": "user", "content": "x"}])
    assert e.value.status is None and waits == [] and client.requests == 1
    client.reached = True  # as after a first answer
    with pytest.raises(ChatError, match="cannot reach .*gave up after 3 attempts"):
        client.complete([{"role": "user", "content": "x"}])
    assert len(waits) == 2


def test_malformed_json_is_retried():
    with serve(lambda i, r: Reply(raw=b'{"choices": [ {"message"') if i == 0 else
               Reply(body={"unexpected": True}) if i == 1 else ok("[[4]]")) as fake:
        client = ChatClient(fake.url, "m", max_retries=3, backoff=0.0001)
        assert client.complete([{"role": "user", "content": "x"}]) == "[[4]]"
    assert len(fake.requests) == 3
    with serve(lambda i, r: Reply(raw=b"<html>bad gateway</html>")) as fake:
        client = ChatClient(fake.url, "m", max_retries=1, backoff=0.0001)
        with pytest.raises(ChatError, match="not JSON"):
            client.complete([{"role": "user", "content": "x"}])


def test_key_is_scrubbed_from_errors():
    def echo(i, request):  # a server that repeats the header back, as some proxies do
        return Reply(401, {"error": {"message": "bad key " + request["headers"].get("Authorization", "")}})

    with serve(echo) as fake:
        client = ChatClient(fake.url, "m", api_key=SECRET, backoff=0.0001)
        with pytest.raises(ChatError) as e:
            client.complete([{"role": "user", "content": "x"}])
    assert e.value.status == 401 and SECRET not in str(e.value) and "***" in str(e.value)
    assert SECRET not in repr(client)


# -- judging stories ------------------------------------------------------------------------------------------------
def test_judge_scores_every_story_and_aspect(stories, tmp_path, capsys):
    out = tmp_path / "out"
    with serve(scoring) as fake:
        assert main(judge_args(fake, stories, out, "--concurrency", "3")) == 0
    assert len(fake.requests) == 9 and fake.max_in_flight <= 3
    assert {aspect_of(r) for r in fake.requests} == set(ASPECTS)
    records = read_results(out)
    assert len(records) == 9 and all(r["status"] == "ok" for r in records)
    assert {(r["story"], r["aspect"]) for r in records} == {(s, a) for s in ("s1", "s2", "s3") for a in ASPECTS}
    assert {r["story"]: r["score"] for r in records} == {"s1": 6, "s2": 8, "s3": 9}
    assert next(r for r in records if r["story"] == "s1")["frames"] == 3
    summary = json.load(open(out / "summary.json"))
    for aspect in ASPECTS:
        s = summary["aspects"][aspect]
        assert s["n"] == 3 and s["mean"] == pytest.approx(23 / 3) and s["ci_low"] < s["mean"] < s["ci_high"]
    printed = capsys.readouterr().out
    assert "7.67" in printed and "style" in printed and "95% CI" in printed


def test_judge_path_follows_the_current_branch(tmp_path):
    tree = StoryTree()
    img = Image.new("RGB", (16, 16))
    root = tree.add(Frame(id=0, parent=None, text="opening", image=img, origin="opening"))
    tree.add(Frame(id=1, parent=root.id, text="old branch", image=img))
    b = tree.add(Frame(id=2, parent=root.id, text="new branch", image=img))
    tree.add(Frame(id=3, parent=b.id, text="after new", image=img))
    tree.select(b.id)  # current is in the middle: the path runs on to its leaf
    save_story(tree, str(tmp_path / "t"))
    story = load_frames(str(tmp_path / "t"), "t")
    assert [t for t, _ in story.frames] == ["opening", "new branch", "after new"]
    assert [t for t, _ in load_frames(str(tmp_path / "t"), "t", max_frames=2).frames] == ["opening", "new branch"]


def test_broken_story_is_reported_and_skipped(stories, tmp_path, capsys):
    (stories / "broken").mkdir()
    (stories / "broken" / "story.json").write_text("{not json")
    (stories / "junk.zip").write_bytes(b"not a zip")
    (stories / "notes.txt").write_text("ignored: not a folder or zip")
    (stories / ".story-tmp123").mkdir()  # an interrupted save: ignored
    assert [n for n, _ in discover_stories(str(stories))] == ["broken", "junk", "s1", "s2", "s3"]
    out = tmp_path / "out"
    with serve(scoring) as fake:
        rc = main(judge_args(fake, stories, out))
    assert rc == 1  # something was left undone
    assert len(fake.requests) == 9
    err = capsys.readouterr().err
    assert "broken" in err and "junk" in err and "not valid JSON" in err
    summary = json.load(open(out / "summary.json"))
    assert set(summary["skipped_stories"]) == {"broken", "junk"}


def test_missing_verdict_recorded_and_retried_only_on_request(stories, tmp_path):
    out = tmp_path / "out"

    def vague(i, request):
        if wanted_score(request) == 8 and aspect_of(request) == "engaging":
            return ok("It is a nice story, I would say quite good overall.")
        return scoring(i, request)

    with serve(vague) as fake:
        assert main(judge_args(fake, stories, out)) == 0
    failed = [r for r in read_results(out) if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["story"] == "s2" and failed[0]["score"] is None
    assert "quite good overall" in failed[0]["reply"]
    summary = json.load(open(out / "summary.json"))
    assert summary["aspects"]["engaging"]["n"] == 2 and summary["aspects"]["engaging"]["failed"] == 1
    assert summary["aspects"]["engaging"]["mean"] == pytest.approx(7.5)

    with serve(scoring) as fake:  # a plain second run asks nothing
        assert main(judge_args(fake, stories, out)) == 0
    assert len(fake.requests) == 0
    with serve(scoring) as fake:
        assert main(judge_args(fake, stories, out, "--retry-failed")) == 0
    assert len(fake.requests) == 1 and aspect_of(fake.requests[0]) == "engaging"
    summary = json.load(open(out / "summary.json"))
    assert summary["aspects"]["engaging"]["n"] == 3 and summary["aspects"]["engaging"]["failed"] == 0


def test_long_replies_are_truncated_in_results(stories, tmp_path):
    out = tmp_path / "out"
    with serve(lambda i, r: ok("blah " * 5000)) as fake:
        main(judge_args(fake, stories, out, "--aspects", "style", "--limit", "1"))
    (record,) = read_results(out)
    assert record["status"] == "failed" and len(record["reply"]) < 4100 and "more characters" in record["reply"]


def test_resume_after_a_hard_failure_scores_nothing_twice(stories, tmp_path, capsys):
    out = tmp_path / "out"
    k = 4

    def dies(i, request):
        return scoring(i, request) if i < k else Reply(503, {"error": "gone"})

    with serve(dies) as fake:
        rc = main(judge_args(fake, stories, out, "--retries", "1", "--max-errors", "1", "--concurrency", "1"))
    assert rc == 1 and "stopped early" in capsys.readouterr().err
    done = read_results(out)
    assert len(done) == k and all(r["status"] == "ok" for r in done)
    done_keys = {r["key"] for r in done}

    with serve(scoring) as fake:
        assert main(judge_args(fake, stories, out, "--concurrency", "2")) == 0
    assert len(fake.requests) == 9 - k
    records = read_results(out)
    assert len(records) == 9 and len({r["key"] for r in records}) == 9
    asked = {(wanted_score(r), aspect_of(r)) for r in fake.requests}
    score_of = {"s1": 6, "s2": 8, "s3": 9}
    assert not asked & {(score_of[r["story"]], r["aspect"]) for r in done}
    assert done_keys < {r["key"] for r in records}


def test_resume_survives_a_line_cut_off_mid_write(stories, tmp_path):
    out = tmp_path / "out"
    with serve(scoring) as fake:
        main(judge_args(fake, stories, out, "--aspects", "style"))
    path = out / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:25])  # killed while writing the third line
    with serve(scoring) as fake:
        assert main(judge_args(fake, stories, out, "--aspects", "style")) == 0
    assert len(fake.requests) == 1
    good = read_results_lenient(path)
    assert len(good) == 3 and len({r["key"] for r in good}) == 3


def read_results_lenient(path):
    out = []
    for line in open(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_fatal_status_stops_the_run(stories, tmp_path, capsys):
    out = tmp_path / "out"
    with serve(lambda i, r: Reply(401, {"error": {"message": "invalid key"}})) as fake:
        rc = main(judge_args(fake, stories, out, "--concurrency", "1"))
    assert rc == 1 and len(fake.requests) == 1
    assert "401" in capsys.readouterr().err
    assert not (out / "results.jsonl").read_text().strip()


def test_changed_settings_refuse_to_mix(stories, tmp_path, capsys):
    out = tmp_path / "out"
    with serve(scoring) as fake:
        assert main(judge_args(fake, stories, out, "--aspects", "style")) == 0
        rc = main(["judge", "--stories", str(stories), "--base-url", fake.url, "--model", "other-judge",
                   "--out", str(out), *FAST])
    assert rc == 2 and "other settings" in capsys.readouterr().err


def test_api_key_never_leaks(stories, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    out = tmp_path / "out"

    def flaky_echo(i, request):
        auth = request["headers"].get("Authorization", "")
        assert auth == f"Bearer {SECRET}"
        if i % 3 == 0:  # errors that echo the header, then a verdict that quotes it too
            return Reply(500, {"error": {"message": f"upstream said {auth}"}})
        return ok(f"I was called with {auth}. [[5]]") if i % 3 == 1 else ok("no verdict " + auth)

    with serve(flaky_echo) as fake:
        main(judge_args(fake, stories, out, "--api-key-env", "MY_JUDGE_KEY", "--retries", "1"))
        with serve(lambda i, r: Reply(401, {"error": {"message": r["headers"].get("Authorization", "")}})) as bad:
            main(judge_args(bad, stories, tmp_path / "out2", "--api-key-env", "MY_JUDGE_KEY"))
    captured = capsys.readouterr()
    assert SECRET not in captured.out and SECRET not in captured.err
    for folder in (out, tmp_path / "out2"):
        for name in os.listdir(folder):
            assert SECRET not in (folder / name).read_text(), name


def test_results_folder_inside_the_stories_folder_is_not_a_story(stories):
    with serve(scoring) as fake:
        assert main(judge_args(fake, stories, stories / "judged", "--aspects", "style")) == 0
        assert main(judge_args(fake, stories, stories / "judged", "--aspects", "style")) == 0
    assert len(fake.requests) == 3


def test_library_call_without_key(stories, tmp_path):
    with serve(scoring) as fake:
        client = ChatClient(fake.url, "judge-1", backoff=0.0001)
        summary, report = judge_stories(client, str(stories), str(tmp_path / "o"), aspects=["coherence"],
                                         progress=False)
    assert report.ok and report.scored == 3 and summary["aspects"]["coherence"]["n"] == 3
    assert set(summary["aspects"]) == {"coherence"}


# -- pairwise ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def two_systems(tmp_path):
    a, b = tmp_path / "sysA", tmp_path / "sysB"
    for name in ("p1", "p2", "p3"):
        make_story(a / name, [f"GOOD story {name}", "and it goes on well"])
        make_story(b / name, [f"weak story {name}", "and it stops"])
    make_story(a / "only_a", ["lonely"])
    return a, b


def first_shown(request):
    t = " ".join(texts(request))
    return "GOOD" if t.index("Story A") < t.find("GOOD") < t.index("Story B") else "weak"


def test_pairwise_both_orders_and_mapping(two_systems, tmp_path, capsys):
    a, b = two_systems
    out = tmp_path / "pw"

    def prefers_good(i, request):
        return ok("Story with GOOD is better. [[A]]" if first_shown(request) == "GOOD" else "[[B]]")

    with serve(prefers_good) as fake:
        assert main(["judge", "--pairwise", str(a), str(b), "--base-url", fake.url, "--model", "j", "--out", str(out),
                     *FAST]) == 0
    assert len(fake.requests) == 3 * 3 * 2
    shown = [first_shown(r) for r in fake.requests]
    assert shown.count("GOOD") == shown.count("weak") == 9  # each pair in both orders
    assert all(len(images(r)) == 4 for r in fake.requests)
    records = read_results(out)
    assert {r["order"] for r in records} == {"ab", "ba"}
    assert all(r["winner"] == "a" for r in records)
    assert {r["verdict"] for r in records if r["order"] == "ab"} == {"A"}
    assert {r["verdict"] for r in records if r["order"] == "ba"} == {"B"}
    summary = json.load(open(out / "summary.json"))
    assert summary["pairs"] == 3 and summary["only_in_a"] == 1
    for aspect in ASPECTS:
        c = summary["aspects"][aspect]["combined"]
        assert c["n"] == 3 and c["win_rate"] == 1.0 and c["consistent_rate"] == 1.0
        assert c["first_shown_rate"] == 0.5
    printed = capsys.readouterr().out
    assert "100.0%" in printed and "sysA" in printed

    with serve(prefers_good) as fake:  # resumable too
        assert main(["judge", "--pairwise", str(a), str(b), "--base-url", fake.url, "--model", "j", "--out", str(out),
                     *FAST]) == 0
    assert not fake.requests


def test_pairwise_position_bias_cancels_out(two_systems, tmp_path):
    a, b = two_systems
    with serve(lambda i, r: ok("[[A]]")) as fake:  # always picks what it saw first
        client = ChatClient(fake.url, "j", backoff=0.0001)
        summary, report = judge_pairwise(client, str(a), str(b), str(tmp_path / "pw"), aspects=["style"],
                                         concurrency=2, progress=False)
    c = summary["aspects"]["style"]["combined"]
    assert report.ok and c["n"] == 3 and c["tie_rate"] == 1.0 and c["win_rate"] == 0.0
    assert c["first_shown_rate"] == 1.0 and c["consistent_rate"] == 0.0
    po = summary["aspects"]["style"]["per_order"]
    assert po["ab"]["win_rate"] == 1.0 and po["ba"]["loss_rate"] == 1.0


def test_pairwise_missing_verdict_and_tie(two_systems, tmp_path):
    a, b = two_systems

    def answers(i, request):
        t = " ".join(texts(request))
        if "p1" in t:
            return ok("They are equal. [[tie]]")
        if "p2" in t and first_shown(request) == "weak":
            return ok("Hard to say.")
        return ok("[[C]]")

    with serve(answers) as fake:
        client = ChatClient(fake.url, "j", backoff=0.0001)
        summary, _ = judge_pairwise(client, str(a), str(b), str(tmp_path / "pw"), aspects=["engaging"], progress=False)
    s = summary["aspects"]["engaging"]
    assert s["failed"] == 1 and s["combined"]["n"] == 2 and s["combined"]["tie_rate"] == 1.0
