"""The embedded BM25 retriever: ranking, both request forms, 400s, a burst, index reuse, the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from igpo_jax.search.clients import make_search_client
from igpo_jax.search.server import Bm25Index, RetrieverServer

DOCS = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Berlin", "Berlin is the capital of Germany and its largest city."),
    ("Mount Everest", "Mount Everest is the highest mountain above sea level."),
    ("Python (programming language)", "Python is a high-level programming language."),
    ("Amazon River", "The Amazon River is the largest river by discharge volume of water."),
    ("Great Wall of China", "The Great Wall of China is a series of fortifications."),
]
EXPECTED_TOP = {"capital of Germany": "1", "highest mountain": "2", "programming language": "3",
                "river discharge volume": "4", "fortifications China": "5", "France capital": "0"}


def write_corpus(path, docs=DOCS):
    with open(path, "w") as file:
        for i, (title, text) in enumerate(docs):
            file.write(json.dumps({"id": str(i), "contents": f'"{title}"\n{text}'}) + "\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")
    with RetrieverServer.from_corpus(corpus, default_topk=2) as running:
        yield running


def post(server, body, raw: bytes | None = None):
    """(status, JSON reply) of POST /retrieve."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + "/retrieve", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(server, path):
    try:
        with urllib.request.urlopen(server.url + path, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_top_k_ranking_on_a_small_corpus(server):
    status, reply = post(server, {"queries": list(EXPECTED_TOP), "topk": 3})
    assert status == 200 and len(reply["result"]) == len(EXPECTED_TOP)
    for docs, expected in zip(reply["result"], EXPECTED_TOP.values()):
        assert len(docs) == 3 and docs[0]["id"] == expected
        assert set(docs[0]) == {"id", "contents"}
    assert reply["result"][0][0]["contents"] == '"Berlin"\nBerlin is the capital of Germany and its largest city.'
    # the two capitals are the top two for "capital of Germany"
    assert {doc["id"] for doc in reply["result"][0][:2]} == {"0", "1"}


def test_scores_form_and_single_query_form(server):
    status, reply = post(server, {"query": "highest mountain", "return_scores": True})
    assert status == 200 and len(reply["result"]) == 1 and len(reply["result"][0]) == 2  # server default topk
    first, second = reply["result"][0]
    assert first["document"]["id"] == "2" and first["score"] > second["score"] >= 0.0


def test_top_k_larger_than_the_corpus_is_clamped(server):
    status, reply = post(server, {"queries": ["capital"], "topk": 50})
    assert status == 200 and len(reply["result"][0]) == len(DOCS)


@pytest.mark.parametrize("body, message", [
    ([1, 2], "JSON object"),
    ({}, "needs 'queries'"),
    ({"queries": "capital"}, "non-empty list"),
    ({"queries": []}, "non-empty list"),
    ({"queries": ["ok", 3]}, "non-empty string"),
    ({"queries": ["   "]}, "non-empty string"),
    ({"query": None}, "non-empty string"),
    ({"queries": ["q"], "topk": 0}, "'topk'"),
    ({"queries": ["q"], "topk": "5"}, "'topk'"),
    ({"queries": ["q"], "topk": True}, "'topk'"),
    ({"queries": ["q"], "return_scores": "yes"}, "'return_scores'"),
    ({"queries": ["x" * 5000]}, "longer than"),
    ({"queries": ["q"] * 2000}, "at most 1024 queries"),
])
def test_malformed_requests_get_400_with_json_error(server, body, message):
    status, reply = post(server, body)
    assert status == 400 and message in reply["error"]


def test_non_json_body_and_unknown_path_keep_the_server_serving(server):
    assert post(server, None, raw=b"{not json") == (400, {"error": "the body is not valid JSON"})
    status, reply = get(server, "/nope")
    assert status == 404 and "error" in reply
    assert get(server, "/health") == (200, {"status": "ok", "documents": len(DOCS)})


def test_a_burst_of_64_concurrent_requests_is_answered_correctly(server):
    queries = [list(EXPECTED_TOP)[i % len(EXPECTED_TOP)] for i in range(64)]

    async def burst():
        async with aiohttp.ClientSession() as session:
            async def one(query):
                async with session.post(server.url + "/retrieve", json={"query": query, "topk": 1}) as reply:
                    return reply.status, await reply.json()
            return await asyncio.gather(*(one(query) for query in queries))

    replies = asyncio.run(burst())
    assert all(status == 200 for status, _ in replies)
    assert [reply["result"][0][0]["id"] for _, reply in replies] == [EXPECTED_TOP[q] for q in queries]


def test_search_client_reaches_the_retriever_over_http(server):
    async def go():
        async with make_search_client("local", base_url=server.url, top_k=2, mock=False) as client:
            return await client.search(["capital of Germany", "highest mountain"])

    germany, everest = asyncio.run(go())
    assert germany.hits[0].title == "Berlin" and germany.hits[0].url == "1"
    assert germany.hits[0].snippet == "Berlin is the capital of Germany and its largest city."
    assert everest.hits[0].title == "Mount Everest"


# ----------------------------------------------------------------------------- index files

def test_index_is_saved_beside_the_corpus_and_reused_until_it_changes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="igpo_jax.search.server")
    corpus = write_corpus(tmp_path / "c.jsonl")
    Bm25Index.open(corpus).close()
    assert (tmp_path / "c.jsonl.bm25s" / "fingerprint.json").is_file()
    assert "building" in caplog.text
    caplog.clear()
    index = Bm25Index.open(corpus)
    assert "reusing" in caplog.text and index.search(["highest mountain"], 1)[0][0][0]["id"] == "2"
    index.close()

    caplog.clear()
    write_corpus(corpus, DOCS + [("Kilimanjaro", "Kilimanjaro is the highest mountain in Africa.")])
    index = Bm25Index.open(corpus)
    assert "building" in caplog.text and index.size == len(DOCS) + 1
    assert index.search(["Kilimanjaro Africa"], 1)[0][0][0] == {
        "id": "6", "contents": '"Kilimanjaro"\nKilimanjaro is the highest mountain in Africa.'}
    index.close()


@pytest.mark.parametrize("lines, message", [
    (['{"id": "0", "contents": "ok"}', "not json"], "c.jsonl:2: not a JSON object"),
    (['{"id": "0"}'], "c.jsonl:1: a row needs 'id' and a string 'contents'"),
    (["", "  "], "the corpus has no documents"),
])
def test_bad_corpus_rows_are_named(tmp_path, lines, message):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        Bm25Index.open(corpus)


def test_blank_lines_are_skipped(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('\n{"id": 7, "contents": "\\"A\\"\\nalpha beta"}\n\n{"id": "x", "contents": "gamma"}\n')
    index = Bm25Index.open(corpus)
    assert index.size == 2 and index.search(["gamma"], 1)[0][0][0] == {"id": "x", "contents": "gamma"}
    assert index.document(0) == {"id": "7", "contents": '"A"\nalpha beta'}
    index.close()


# ----------------------------------------------------------------------------- command line

def test_command_line_server(tmp_path):
    corpus = write_corpus(tmp_path / "cli.jsonl")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "igpo_jax.search.server", f"--corpus={corpus}",
                                "--host=127.0.0.1", f"--port={port}", "--topk=1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    assert json.loads(reply.read())["documents"] == len(DOCS)
                    break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "the server did not come up in 30 s"
                time.sleep(0.1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/retrieve", method="POST",
                                         data=json.dumps({"queries": ["programming language"]}).encode())
        with urllib.request.urlopen(request, timeout=5) as reply:
            result = json.loads(reply.read())["result"]
        assert len(result[0]) == 1 and result[0][0]["id"] == "3"
    finally:
        process.terminate()
        process.wait(timeout=10)
