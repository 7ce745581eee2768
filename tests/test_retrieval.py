"""Teacher-pool retrieval: the shared 1.7B bank with all-MiniLM-L6-v2 over AIME 2025, lexical / embedding /
hybrid / random modes, the build-index stage and its bank-version check."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from stages.build_index import BuildIndexConfig
from stages.engine.skills.index import read_index
from stages.build_index import run as build_index
from stages.engine.errors import InputError
from stages.engine.skills.retrieval import EmbeddingRetriever, HybridRetriever, LexicalRetriever, make_retriever, retrieve, retrieve_many, retrieval_stats
from stages.engine.skills.encoders import MeanPoolEncoder, load_encoder
from stages.engine.skills.bank import load_bank

from conftest import DEMO_BANK
from test_mine_skills import cli, error_lines

DAPO = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{p}\n\n"
        "Remember to put your answer on its own line after \"Answer:\".")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bank17(shared_data):
    return load_bank(shared_data / "skill_banks" / "sgsd_qwen3_1.7b.json")


@pytest.fixture(scope="module")
def aime25(shared_data):
    return [json.loads(line)["problem"] for line in (shared_data / "aime25.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def emb17(bank17, minilm):
    """The 1.7B bank embedded once with all-MiniLM-L6-v2 (shared by the tests of this module)."""
    return make_retriever(bank17, "embedding", encoder=str(minilm))


@pytest.fixture(scope="module")
def emb_pools(emb17, aime25):
    return retrieve_many(emb17, aime25, k=8)


def pool_key(pools):
    return [[(t.skill["skill_id"], t.mistake["mistake_id"], t.weight) for t in pool] for pool in pools]


def check_pools(pools, bank, n):
    assert len(pools) == n
    for pool in pools:
        assert len(pool) == 8  # K = min(8, 8) (the bank has 28 skills and 98 mistakes)
        assert abs(sum(t.weight for t in pool) - 1.0) < 1e-9
        assert [t.rank for t in pool] == list(range(8))
        sk = [t.skill_score for t in pool]
        mk = [t.mistake_score for t in pool]
        assert sk == sorted(sk, reverse=True) and mk == sorted(mk, reverse=True)  # ranked separately
        assert len({t.skill["skill_id"] for t in pool}) == 8 and len({t.mistake["mistake_id"] for t in pool}) == 8
        pair = [(a + b) / 2 for a, b in zip(sk, mk)]
        w = np.exp(np.array(pair) - max(pair))
        np.testing.assert_allclose([t.weight for t in pool], w / w.sum(), rtol=1e-12)  # softmax of mean pair score


def test_lexical_aime25(bank17, aime25):
    r1 = make_retriever(bank17, "lexical")
    pools = retrieve_many(r1, aime25, k=8)
    check_pools(pools, bank17, 30)
    assert pool_key(pools) == pool_key(retrieve_many(LexicalRetriever(bank17), aime25, k=8))  # deterministic
    assert pool_key([retrieve(r1, aime25[3])]) == pool_key(pools[3:4])  # one query = batch of queries
    assert all(0.0 <= t.skill_score <= 1.0 for pool in pools for t in pool)
    # not the same pool for every problem
    assert len({tuple(x[:2] for x in pool) for pool in pool_key(pools)}) > 10


def test_embedding_aime25_minilm(bank17, aime25, minilm, emb17, emb_pools):
    r1, pools = emb17, emb_pools
    assert isinstance(r1, EmbeddingRetriever) and r1.encoder.kind == "sentence-transformers"
    check_pools(pools, bank17, 30)
    assert all(-1.0 <= t.skill_score <= 1.0 for pool in pools for t in pool)
    # normalised embeddings: cosine == dot product
    np.testing.assert_allclose(np.linalg.norm(r1.skill_emb, axis=1), 1.0, atol=1e-5)
    # deterministic across runs: a freshly loaded encoder gives the same pools and weights
    load_encoder.cache_clear()
    r2 = make_retriever(bank17, "embedding", encoder=str(minilm))
    assert r2.encoder is not r1.encoder
    p2 = retrieve_many(r2, aime25, k=8)
    assert [[(a, b) for a, b, _ in pool] for pool in pool_key(p2)] == [[(a, b) for a, b, _ in pool] for pool in pool_key(pools)]
    np.testing.assert_allclose([t.weight for p in p2 for t in p], [t.weight for p in pools for t in p], atol=1e-6)
    # a single query ranks like the batch
    single = retrieve(r1, aime25[7])
    assert [(t.skill["skill_id"], t.mistake["mistake_id"]) for t in single] == [x[:2] for x in pool_key(pools)[7]]
    # the DAPO instruction wrapper is stripped from the query
    wrapped = retrieve(r1, DAPO.format(p=aime25[7]))
    assert [(t.skill["skill_id"], t.mistake["mistake_id"]) for t in wrapped] == [x[:2] for x in pool_key(pools)[7]]
    # embedding and lexical rankings are different methods
    lex = pool_key(retrieve_many(make_retriever(bank17, "lexical"), aime25, k=8))
    assert [x[:2] for p in lex for x in p] != [x[:2] for p in pool_key(pools) for x in p]


def test_hybrid_and_random(bank17, aime25, minilm, emb17):
    h = HybridRetriever(bank17, emb17, LexicalRetriever(bank17))
    e, lx = emb17.similarities(aime25[0]), h.lexical.similarities(aime25[0])
    hs = h.similarities(aime25[0])
    np.testing.assert_allclose(hs[0], 0.5 * np.array(e[0]) + 0.5 * np.array(lx[0]), atol=1e-6)
    np.testing.assert_allclose(hs[1], 0.5 * np.array(e[1]) + 0.5 * np.array(lx[1]), atol=1e-6)
    check_pools(retrieve_many(h, aime25[:5]), bank17, 5)
    demo = load_bank(DEMO_BANK)
    hd = make_retriever(demo, "hybrid", encoder=str(minilm))
    assert hd.mode == "hybrid" and len(retrieve(hd, "Compute 22 + 6.")) == 6
    r = make_retriever(bank17, "random", seed=1)
    p1 = pool_key(retrieve_many(r, aime25, k=8))
    check_pools(retrieve_many(r, aime25, k=8), bank17, 30)
    assert p1 == pool_key(retrieve_many(make_retriever(bank17, "random", seed=1), aime25, k=8))  # seeded
    assert p1 != pool_key(retrieve_many(make_retriever(bank17, "random", seed=2), aime25, k=8))
    assert p1[0] != p1[1]  # a different draw per problem
    with pytest.raises(InputError, match="unknown retrieval mode"):
        make_retriever(bank17, "bm42")


def test_k_is_min_of_counts():
    bank = load_bank(DEMO_BANK)
    bank.mistakes = bank.mistakes[:3]
    pool = retrieve(make_retriever(bank, "lexical"), "Compute 2+3", k=8)
    assert len(pool) == 3 and abs(sum(t.weight for t in pool) - 1) < 1e-12


def test_mean_pool_encoder_matches_sentence_transformers(minilm):
    """An HF encoder without sentence-transformers: mean pooling via AutoModel (MiniLM is a mean-pool model)."""
    st = load_encoder(str(minilm))
    hf = MeanPoolEncoder(str(minilm))
    texts = ["Find the remainder when 2^100 is divided by 7.", "Count lattice paths in a 4 by 4 grid."]
    a, b = st.encode(texts), hf.encode(texts)
    assert a.shape == b.shape == (2, 384)
    assert np.min(np.sum(a * b, axis=1)) > 0.9999
    assert load_encoder(str(minilm), "cpu", "hf").kind == "hf-mean-pool"


def test_build_index_and_version_check(bank17, aime25, minilm, emb17, tmp_path, shared_data):
    run = tmp_path / "run"
    res = cli(["build-index", "--bank", str(shared_data / "skill_banks" / "sgsd_qwen3_1.7b.json"), "--encoder", str(minilm),
               "--mode", "embedding", "--run-dir", str(run)])
    assert res.exit_code == 0, res.output
    df = pl.read_parquet(run / "index.parquet")
    assert df.height == 28 + 98 and set(df["bank_version"]) == {bank17.version} and set(df["encoder"]) == {str(minilm)}
    assert df.filter(pl.col("kind") == "skill")["item_id"].to_list() == [s["skill_id"] for s in bank17.skills]
    emb = np.array(df["embedding"].to_list())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # retrieval from the index = retrieval encoding the items on the fly
    with_index = make_retriever(bank17, "embedding", index_path=run / "index.parquet")
    a, b = retrieve_many(with_index, aime25[:10]), retrieve_many(emb17, aime25[:10])
    assert [x[:2] for p in pool_key(a) for x in p] == [x[:2] for p in pool_key(b) for x in p]
    # rerun: manifest matches, skipped
    mtime = (run / "index.parquet").stat().st_mtime_ns
    assert cli(["build-index", "--bank", str(shared_data / "skill_banks" / "sgsd_qwen3_1.7b.json"), "--encoder",
                str(minilm), "--run-dir", str(run)]).exit_code == 0
    assert (run / "index.parquet").stat().st_mtime_ns == mtime

    # an index built from another bank version is refused, one line, exit 2
    other = load_bank(shared_data / "skill_banks" / "sgsd_qwen3_4b.json")
    with pytest.raises(InputError, match=f"index was built from bank version {bank17.version}, not {other.version}"):
        make_retriever(other, "embedding", index_path=run / "index.parquet")
    res = cli(["skills", "stats", str(shared_data / "skill_banks" / "sgsd_qwen3_4b.json"), "--problems",
               str(shared_data / "aime25.jsonl"), "--mode", "embedding", "--index", str(run / "index.parquet")])
    lines = error_lines(res)
    assert res.exit_code == 2 and len(lines) == 1 and "index was built from bank version" in lines[0], res.output
    # another encoder than the index's is refused too
    with pytest.raises(InputError, match="index was built with encoder"):
        make_retriever(bank17, "embedding", index_path=run / "index.parquet", encoder="Qwen/Qwen3-Embedding-0.6B")


def test_score_teachers_refuses_other_bank_index(tiny, tiny_model_dir, tmp_path, shared_data):
    """`score-teachers` (stages.score_teachers.run) refuses an index built from another bank version."""
    from stages.engine.generation.factory import make_backend
    from stages.rollout import RolloutConfig, generate_rollouts
    from stages.score_teachers import ScoreTeachersConfig
    from stages.score_teachers import run as score_run

    build_index(BuildIndexConfig(bank=str(DEMO_BANK), mode="lexical"), tmp_path / "idx")
    model, tok, _ = tiny
    problems = pl.read_ndjson(shared_data / "aime25.jsonl").head(2).select("id", "problem", "answer")
    roll = generate_rollouts(make_backend("hf", model=model, tokenizer=tok), tok, problems,
                             RolloutConfig(model="tiny", max_new_tokens=4), "tiny")
    roll.write_parquet(tmp_path / "rollout.parquet")
    cfg = ScoreTeachersConfig(model=str(tiny_model_dir), bank=str(shared_data / "skill_banks" / "sgsd_qwen3_8b.json"),
                      index=str(tmp_path / "idx" / "index.parquet"), retrieval="lexical", device="cpu", dtype="fp32")
    with pytest.raises(InputError, match="index was built from bank version"):
        score_run(cfg, tmp_path / "score", rollouts=tmp_path / "rollout.parquet")
    assert not (tmp_path / "score" / "score_teachers.parquet").exists()


def test_lexical_index_and_mode_mismatch(tmp_path):
    bank = load_bank(DEMO_BANK)
    p = build_index(BuildIndexConfig(bank=str(DEMO_BANK), mode="lexical"), tmp_path)
    idx = read_index(p, bank)
    assert idx.mode == "lexical" and not idx.has_embeddings and idx.encoder is None
    r = make_retriever(bank, "lexical", index_path=p)
    assert isinstance(r, LexicalRetriever)
    with pytest.raises(InputError, match="holds no embeddings"):
        make_retriever(bank, "embedding", index_path=p)
    with pytest.raises(InputError, match="unknown index mode"):
        build_index(BuildIndexConfig(bank=str(DEMO_BANK), mode="dense"), tmp_path / "x")
    res = cli(["build-index", "--bank", str(DEMO_BANK), "--encoder", str(tmp_path / "no-such-encoder"),
               "--run-dir", str(tmp_path / "y")])
    assert res.exit_code == 2 and len(error_lines(res)) == 1 and "encoder folder does not exist" in res.output


def test_retrieval_stats(bank17, aime25, tmp_path, shared_data):
    r = make_retriever(bank17, "lexical")
    df = retrieval_stats(r, aime25, k=8)
    assert df.height == 28 + 98
    assert df.filter(pl.col("kind") == "skill")["retrieved"].sum() == 30 * 8
    assert df.filter(pl.col("kind") == "mistake")["retrieved"].sum() == 30 * 8
    assert df.filter(pl.col("kind") == "skill")["top1"].sum() == 30
    out = tmp_path / "stats.parquet"
    res = cli(["skills", "stats", str(shared_data / "skill_banks" / "sgsd_qwen3_1.7b.json"), "--problems",
               str(shared_data / "aime25.jsonl"), "--top", "5", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "30 problems" in res.output and "never retrieved" in res.output
    assert pl.read_parquet(out).equals(df)


def test_top_k_is_the_sorted_reference_with_ties():
    from stages.engine.skills.retrieval import top_k

    rng = np.random.default_rng(21)
    for n, k in [(0, 3), (1, 3), (5, 5), (50, 8), (1000, 8), (1000, 1000)]:
        s = rng.integers(0, 7, n) / 7.0  # many ties, also across the cut
        ref = sorted(range(n), key=lambda i: (-s[i], i))[:k]
        assert top_k(s, k) == ref and top_k(s.tolist(), k) == ref
    assert top_k([0.5, float("nan"), 0.9], 3) == [2, 0, 1]


def test_large_bank_retrieval_reports_progress_and_matches_the_full_sort():
    """Issue 21: a 100k-item bank: progress as batches finish (smaller batches for a large bank), and the pools
    are those of a full sort of the similarities."""
    from stages.engine.skills.bank import SkillBank
    from stages.engine.skills.retrieval import RandomRetriever, teacher_pool

    n = 100_000
    bank = SkillBank(skills=[{"skill_id": f"s{i}", "title": "t", "principle": "p", "when_to_apply": "w"} for i in range(n)],
                     mistakes=[{"mistake_id": f"m{i}", "description": "d", "why_it_happens": "y", "how_to_avoid": "h"}
                               for i in range(50)])
    r = RandomRetriever(bank, seed=3)
    problems = [f"problem {i}" for i in range(25)] + ["problem 0"]
    calls: list[int] = []
    pools = retrieve_many(r, problems, k=8, on_done=calls.append)
    assert sum(calls) == 25 and len(calls) > 1  # distinct problems, in several batches
    for q, pool in zip(problems[:3], pools[:3]):
        sk, mk = r.similarities(q)
        si = sorted(range(n), key=lambda i: (-sk[i], i))[:8]
        mi = sorted(range(50), key=lambda i: (-mk[i], i))[:8]
        assert [t.skill["skill_id"] for t in pool] == [f"s{i}" for i in si]
        assert [t.mistake["mistake_id"] for t in pool] == [f"m{i}" for i in mi]
        assert [t.weight for t in pool] == [t.weight for t in teacher_pool(bank, list(sk), list(mk), 8)]
    assert pool_key(pools[:1]) == pool_key(pools[-1:])
