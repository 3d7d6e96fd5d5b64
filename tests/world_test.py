"""Tests for igpo_jax.data.world: determinism, answerability from the corpus, and the file formats."""

import json
import time
import bm25s
import pyarrow.parquet as pq
import pytest

from igpo_jax.data import examples as examples_lib, world


@pytest.fixture(scope="module")
def default_world():
    return world.build_world(seed=0)


def test_same_seed_same_world_different_seed_different_world():
    assert world.build_world(seed=3) == world.build_world(seed=3)
    other = world.build_world(seed=4)
    assert other.documents != world.build_world(seed=3).documents
    assert other.questions != world.build_world(seed=3).questions


def test_written_files_are_identical_for_a_seed(tmp_path):
    first = world.write_world(tmp_path / "a", seed=1)
    second = world.write_world(tmp_path / "b", seed=1)
    for name in ("train", "test", "corpus"):
        a, b = getattr(first, name), getattr(second, name)
        if name == "corpus":
            assert a.read_bytes() == b.read_bytes()
        else:
            assert pq.read_table(a).equals(pq.read_table(b))


def test_default_size_and_speed():
    start = time.perf_counter()
    built = world.build_world(seed=0)
    assert time.perf_counter() - start < 1.0
    assert len(built.documents) == 200
    assert len(built.questions) == 400
    sources = [q.data_source for q in built.questions]
    assert sources.count("synthetic_1hop") == sources.count("synthetic_2hop") == 200
    assert {q.split for q in built.questions} == {"train", "test"}
    assert sum(q.split == "test" for q in built.questions) == 40
    assert len({q.question for q in built.questions}) == 400
    assert len({q.index for q in built.questions}) == 400


def test_every_answer_is_stated_by_the_last_supporting_document(default_world):
    for q in default_world.questions:
        assert q.answers and all(q.answers)
        answer_doc = default_world.document(q.supporting_doc_ids[-1])
        assert q.answers[0] in answer_doc.text, (q, answer_doc)


def test_the_question_names_its_first_document(default_world):
    for q in default_world.questions:
        assert default_world.document(q.supporting_doc_ids[0]).title in q.question


def test_two_hop_questions_need_two_documents(default_world):
    two_hop = [q for q in default_world.questions if q.hops == 2]
    assert two_hop
    for q in two_hop:
        first, second = (default_world.document(i) for i in q.supporting_doc_ids)
        # The answer is not in the question entity's document ...
        assert not any(a.lower() in first.contents.lower() for a in q.answers), q
        # ... nor in any other document that names the question entity ...
        for document in default_world.documents:
            if first.title in document.contents:
                assert not any(a in document.contents for a in q.answers), (q, document)
        # ... but the first document names the entity whose document holds it.
        assert second.title in first.text, q
        assert second.title not in q.question, q


def test_documents_are_findable_by_bm25_from_the_question(default_world):
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([d.contents for d in default_world.documents],
                                   stopwords="en", show_progress=False), show_progress=False)

    def top_ids(query, k):
        query_tokens = bm25s.tokenize([query], stopwords="en", show_progress=False,
                                      return_ids=False)
        ids, _ = retriever.retrieve(query_tokens, k=k, show_progress=False)
        return [str(i) for i in ids[0]]

    for q in default_world.questions:
        assert q.supporting_doc_ids[0] in top_ids(q.question, 3), q
        if q.hops == 2:
            # The second hop: searching for the entity the first document names finds it.
            second = default_world.document(q.supporting_doc_ids[1])
            assert top_ids(second.title, 1) == [second.id], q


def test_names_are_distinct_and_fictional(default_world):
    titles = [d.title for d in default_world.documents]
    assert len(set(titles)) == len(titles)
    words = {w.lower() for t in titles for w in t.split()} - {
        "university", "institute", "of", "technology", "college", "industries", "systems",
        "labs", "works", "holdings", "dynamics", "group"}
    assert not words & world._REAL_NAMES
    for word in words:
        assert not any(word != other and word in other for other in words), word


def test_parquet_round_trips_through_the_reader(tmp_path, default_world):
    files = world.write_world(tmp_path, seed=0)
    for path in (files.train, files.test):
        assert pq.read_schema(path).remove_metadata() == examples_lib.PARQUET_SCHEMA_WITH_DOCS
    by_index = {q.index: q for q in default_world.questions}
    train = examples_lib.load_examples(files.train)
    test = examples_lib.load_examples(files.test)
    assert len(train) + len(test) == len(default_world.questions)
    for example, split in [(e, "train") for e in train] + [(e, "test") for e in test]:
        q = by_index[example.index]
        assert example == q.to_example()
        assert example.split == split
        assert example.golden_answers == q.answers
        assert example.prompt == (examples_lib.Message("user", q.question),)
        assert example.supporting_doc_ids == q.supporting_doc_ids and example.supporting_doc_ids
        assert example.data_source in ("synthetic_1hop", "synthetic_2hop")


def test_parquet_schema_matches_the_reference_file(tmp_path, reference_dev_file):
    # the reference's schema, with one more extra_info field (supporting_doc_ids) after its own
    files = world.write_world(tmp_path, seed=0, num_questions=20)
    ours, reference = (pq.read_schema(p).remove_metadata() for p in (files.train, reference_dev_file))
    assert ours.names == reference.names
    for name in reference.names:
        if name != "extra_info":
            assert ours.field(name) == reference.field(name)
    extra_ours, extra_ref = ours.field("extra_info").type, reference.field("extra_info").type
    assert [extra_ours.field(i) for i in range(extra_ref.num_fields)] == \
        [extra_ref.field(i) for i in range(extra_ref.num_fields)]
    assert extra_ours.num_fields == extra_ref.num_fields + 1


def test_corpus_is_search_r1_jsonl(tmp_path, default_world):
    files = world.write_world(tmp_path, seed=0)
    rows = [json.loads(line) for line in files.corpus.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(default_world.documents)
    for row, document in zip(rows, default_world.documents):
        assert set(row) == {"id", "contents"} and isinstance(row["id"], str)
        title, text = row["contents"].split("\n", 1)
        assert title == f'"{document.title}"' and text == document.text
    assert len({row["id"] for row in rows}) == len(rows)


def test_command_line_writes_the_files(tmp_path, capsys):
    world.main([f"--out={tmp_path}", "--seed=2", "--num_questions=30"])
    assert "corpus.jsonl" in capsys.readouterr().out
    examples = examples_lib.load_examples([tmp_path / "train.parquet", tmp_path / "test.parquet"])
    assert len(examples) == 30
    world.main([f"--out={tmp_path / 'kinds'}", "--num_questions=20", "--two_hop_fraction=0",
                "--question_kinds=person.birth_year, company.founded"])
    examples = examples_lib.load_examples([tmp_path / "kinds" / "train.parquet", tmp_path / "kinds" / "test.parquet"])
    assert len(examples) == 20 and all(e.question.startswith("In which year was") for e in examples)


def test_asking_for_more_questions_than_the_world_holds_is_a_clear_error():
    with pytest.raises(ValueError, match="enlarge WorldShape"):
        world.build_world(seed=0, num_questions=100,
                          shape=world.WorldShape(countries=1, cities=1, rivers=1,
                                                 universities=1, companies=1, people=2))


@pytest.mark.parametrize("kwargs", [{}, {"num_questions": 200},
                                    {"num_questions": 512, "two_hop_fraction": 0.0, "test_fraction": 0.5}])
def test_test_questions_are_about_entities_no_training_question_asks_about(kwargs):
    built = world.build_world(seed=0, **kwargs)
    test = [q for q in built.questions if q.split == "test"]
    train = [q for q in built.questions if q.split == "train"]
    n = kwargs.get("num_questions", 400)
    assert len(test) == round(n * kwargs.get("test_fraction", 0.1)) and len(test) + len(train) == n
    test_docs = {d for q in test for d in q.supporting_doc_ids}
    train_docs = {d for q in train for d in q.supporting_doc_ids}
    assert test_docs and train_docs and not test_docs & train_docs
    # nor does a training question name a held-out entity (a two-hop question names only its first)
    held_titles = {built.document(d).title for d in test_docs}
    assert not any(title in q.question for q in train for title in held_titles)
    hops = [q.hops for q in test]
    assert hops.count(2) == round(len(test) * kwargs.get("two_hop_fraction", 0.5))


def test_question_kinds_restrict_the_questions_and_leave_the_corpus_alone():
    kinds = ("person.birthplace", "company.founded")
    built = world.build_world(seed=0, num_questions=60, two_hop_fraction=0.0, test_fraction=0.5,
                              question_kinds=kinds)
    asked = {q.question.split(" ")[0] + " " + q.question.split(" ")[-1] for q in built.questions}
    assert asked == {"Where born?", "In founded?"}  # "Where was X born?", "In which year was X founded?"
    # the round-robin asks each named kind equally often, on both sides of the split
    for split in ("train", "test"):
        questions = [q.question for q in built.questions if q.split == split]
        assert sum(q.startswith("Where") for q in questions) == len(questions) // 2
    assert built.documents == world.build_world(seed=0).documents
    # naming every kind is the default world, question for question
    assert world.build_world(seed=0, question_kinds=world.QUESTION_KINDS) == world.build_world(seed=0)


def test_unknown_or_hopless_question_kinds_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown world question kind\(s\) \['person.shoe_size'\]"):
        world.build_world(seed=0, question_kinds=("person.birthplace", "person.shoe_size"))
    with pytest.raises(ValueError, match="50% of the questions are 2-hop, but none"):
        world.build_world(seed=0, two_hop_fraction=0.5, question_kinds=("person.birthplace",))
    assert len(world.QUESTION_KINDS) == len(set(world.QUESTION_KINDS)) == 22


# ----------------------------------------------------------------------------- the two-hop rung

@pytest.fixture(scope="module")
def two_hop(tmp_path_factory):
    """configs/world_two_hop_igpo.py's world, its corpus behind the embedded retriever's BM25 index."""
    from configs.world_two_hop_igpo import get_config
    from igpo_jax.components import world_arguments
    from igpo_jax.search.server import Bm25Index

    arguments = world_arguments(get_config().data)
    built = world.build_world(**arguments)
    files = world.write_world(tmp_path_factory.mktemp("two_hop"), **arguments)
    index = Bm25Index.open(files.corpus)
    yield built, lambda query: index.search([query], 1)[0][0][0]["id"]
    index.close()


def test_without_namesakes_the_world_is_the_one_it_was():
    # the repr's digest of build_world(seed=0) before namesakes existed (2026-12-07): no new draws
    import hashlib

    assert hashlib.md5(repr(world.build_world(seed=0)).encode()).hexdigest() == "ac97fc9bb9e029b0a6986031e0e21497"


def test_a_second_query_naming_the_bridge_finds_the_answer_and_a_wrong_one_does_not(two_hop):
    built, top1 = two_hop
    questions = [q for q in built.questions if q.hops == 2]
    assert len(questions) == len(built.questions) == 320
    by_title = {d.title: d for d in built.documents}
    namesake_found, other_paths = 0, 0
    for q in questions:
        first, bridge = (built.document(i) for i in q.supporting_doc_ids)
        states_answer = lambda doc_id: any(a.lower() in built.document(doc_id).contents.lower() for a in q.answers)
        assert top1(bridge.title) == bridge.id and states_answer(bridge.id), q  # the bridge, in full
        assert top1(first.title) == first.id and not states_answer(first.id), q  # the question's entity again
        # any other entity the first document names: its own document, which states the answer
        # only by coincidence (the person's university in the same city as its employer: 2 of 320)
        for title, doc in by_title.items():
            if title != bridge.title and title != first.title and title in first.text:
                assert top1(title) == doc.id, (q, title)
                other_paths += states_answer(doc.id)
        short = bridge.title.split(" ")[0]
        namesakes = [d for d in built.documents if d.title.split(" ")[0] == short and d.id != bridge.id]
        if namesakes and " " in bridge.title and top1(short) != bridge.id:
            assert not states_answer(top1(short)), q  # half the name: the namesake's place or year
            namesake_found += 1
    assert other_paths <= len(questions) // 100
    assert namesake_found >= 10  # namesakes do catch a query that names half of the bridge


def test_namesakes_share_a_short_name_which_is_then_no_alias():
    shape = world.WorldShape(countries=12, cities=60, universities=30, companies=80, people=240, namesakes=30)
    built = world.build_world(seed=0, num_questions=200, two_hop_fraction=0.0, test_fraction=0.3, shape=shape,
                              question_kinds=("person.employer",))
    assert len(built.documents) == 12 + 60 + 30 + 110 + 240  # countries, cities, universities, companies, people
    companies = [d.title for d in built.documents if d.title.split(" ")[-1] in world._COMPANY_KINDS]
    shorts = [t.split(" ")[0] for t in companies]
    shared = {s for s in shorts if shorts.count(s) == 2}
    assert len(shared) == 30 and max(shorts.count(s) for s in shorts) == 2
    for q in built.questions:  # "Which company does X work for?": the full name, plus the short one if unshared
        assert q.answers[1:] == (() if q.answers[0].split(" ")[0] in shared else (q.answers[0].split(" ")[0],))
    with pytest.raises(ValueError, match="people >= companies \\+ namesakes"):
        world.build_world(seed=0, shape=world.WorldShape(people=45, namesakes=10))


def test_two_hop_test_questions_are_about_entities_no_training_question_asks_about(two_hop):
    built, _ = two_hop
    test_docs = {d for q in built.questions if q.split == "test" for d in q.supporting_doc_ids}
    train_docs = {d for q in built.questions if q.split == "train" for d in q.supporting_doc_ids}
    assert len([q for q in built.questions if q.split == "test"]) == 96
    assert test_docs and train_docs and not test_docs & train_docs
