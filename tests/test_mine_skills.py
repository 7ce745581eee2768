"""`sgsd mine-skills`: memories -> candidates -> merge, with a scripted OpenAI-compatible writer endpoint,
the tiny model's own attempts, a local writer on the tiny model, and SmolLM2-135M as a real writer."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest
from typer.testing import CliRunner

from stages.engine.errors import InputError
from stages.engine.manifest import read_manifest
from stages.mine_skills import MineSkillsConfig
from stages.engine.skills.mining import MiningParams, build_memories, dedupe_items, excerpt, hierarchical_merge
from stages.mine_skills import run as mine_run
from stages.engine.skills.bank import load_bank
from stages.engine.skills.writer import HTTPWriter, LocalWriter, Writer, WriterConfig, parse_json_reply

from conftest import DEMO_PROBLEMS


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# the fake writer endpoint (also used by test_skill_versions.py)


def merge_items_of(prompt: str) -> list[dict]:
    """The item list a merge prompt carries (after '... to merge:')."""
    at = prompt.index("to merge:")
    return json.JSONDecoder().raw_decode(prompt, prompt.index("[", at))[0]


def merge_key(prompt: str) -> str:
    return "general_skills" if "Skills to merge:" in prompt else "common_mistakes"


class FakeEndpoint:
    """OpenAI chat-completions on 127.0.0.1 answering from a script.

    ``extract(prompt, i)`` gives the reply to the i-th extraction request, ``merge(items, prompt)`` the
    reply to a merge request (default: the items unchanged, a writer that finds nothing to merge).
    ``sleep_s`` delays every answer (timeout tests); ``status`` answers every request with that HTTP code.
    """

    def __init__(self, extract=None, merge=None, sleep_s: float = 0.0, status: int = 200):
        self.extract = extract or (lambda prompt, i: "")
        self.merge = merge or (lambda items, prompt: json.dumps({merge_key(prompt): items}))
        self.sleep_s, self.status = sleep_s, status
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.n_extract = 0
        ep = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with ep.lock:
                    ep.requests.append(body)
                    ep.headers.append(dict(self.headers))
                if ep.sleep_s:
                    time.sleep(ep.sleep_s)
                if ep.status != 200:
                    self.send_response(ep.status)
                    self.send_header("Content-Length", "30")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "nope"}}')
                    return
                prompt = body["messages"][-1]["content"]
                if "to merge:" in prompt:
                    content = ep.merge(merge_items_of(prompt), prompt)
                else:
                    with ep.lock:
                        i = ep.n_extract
                        ep.n_extract += 1
                    content = ep.extract(prompt, i)
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def cli(args: list[str]):
    import sgsd_cli.build_index_cmd  # noqa: F401  (importing a command module registers its commands)
    import sgsd_cli.mine_skills_cmd  # noqa: F401
    import sgsd_cli.skills_cmd  # noqa: F401
    from sgsd_cli.common import app

    return CliRunner().invoke(app, args)


def error_lines(res) -> list[str]:
    return [line for line in res.output.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# attempts of the tiny model


def tiny_attempts(tiny, n: int = 8, make_correct=lambda i: i % 2 == 0) -> pl.DataFrame:
    """The tiny model's rollouts on demo problems; attempts picked by ``make_correct`` get the gold
    answer boxed at the end (the tiny random model never solves anything by itself)."""
    from stages.engine.generation.factory import make_backend
    from stages.rollout import RolloutConfig, generate_rollouts

    model, tok, spec = tiny
    problems = pl.read_ndjson(DEMO_PROBLEMS).head(n).select("id", "problem", "answer")
    cfg = RolloutConfig(model="tiny", max_new_tokens=12, temperature=1.0, top_k=0, seed=1)
    df = generate_rollouts(make_backend("hf", model=model, tokenizer=tok), tok, problems, cfg, "tiny")
    return df.with_columns(
        pl.when(pl.Series([make_correct(i) for i in range(df.height)]))
        .then(pl.col("completion") + pl.lit(" so the answer is \\boxed{") + pl.col("answer") + pl.lit("}"))
        .otherwise(pl.col("completion"))
        .alias("completion")
    )


def skills_json(*items) -> str:
    return json.dumps({"general_skills": [dict(zip(("title", "principle", "when_to_apply"), it)) for it in items]})


def mistakes_json(*items) -> str:
    return json.dumps({"common_mistakes": [dict(zip(("description", "why_it_happens", "how_to_avoid"), it)) for it in items]})


S1 = ("Check small cases", "Compute the first few values and look for a pattern before proving it.", "Sequences and counting problems.")
S2 = ("Work backwards", "Undo the operations from the result to recover the unknown.", "Linear equations with one unknown.")
S3 = ("Reduce modulo early", "Replace factors by remainders before multiplying large numbers.", "Remainder questions.")
S1_NEAR = ("Check small cases", "Compute the first few values and look for a pattern before proving it!", "Sequences and counting problems")
M1 = ("Dropping a sign when moving a term", "Terms are moved across the equals sign in a hurry.", "Rewrite the whole equation after each move.")
M2 = ("Stopping before a final answer", "The solution runs out of room.", "State the boxed answer as soon as it is known.")
M3 = ("Misreading the question", "The asked quantity differs from the computed one.", "Reread the last sentence before answering.")
M4 = ("Arithmetic slip in carrying", "Mental addition of many digits.", "Add column by column and check by estimation.")

# replies in memory order (concurrency 1): even attempts succeed, odd ones fail
SCRIPT = [
    skills_json(S1, S2),                                    # 0 ok: 2 skills
    mistakes_json(M1, M2, M3, M4),                          # 1 ok: 4 mistakes, capped at 3
    '{"general_skills": [{"title": "Broken", "principle": ',  # 2 unparsable (cut off)
    "",                                                     # 3 empty
    "Here you go:\n```json\n" + skills_json(S1) + "\n```",  # 4 ok: exact duplicate of S1
    '{"common_mistakes": []}',                              # 5 no_items
    "<think>let me see</think>" + skills_json(S1_NEAR, S3),  # 6 ok: near duplicate of S1 + S3
    json.dumps({"common_mistakes": [{"description": "no reason given"}]}),  # 7 no_items (item lacks fields)
]


def test_mining_steps_with_scripted_endpoint(tiny, tmp_path, monkeypatch):
    attempts = tiny_attempts(tiny)
    rpath = tmp_path / "rollouts.parquet"
    attempts.write_parquet(rpath)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SGSD_TEST_WRITER_KEY", "secret-123")
    with FakeEndpoint(extract=lambda prompt, i: SCRIPT[i]) as ep:
        args = ["mine-skills", "--run-dir", str(run_dir), "--rollouts", str(rpath), "--writer-url", ep.url,
                "--writer-model", "scripted", "--writer-key-env", "SGSD_TEST_WRITER_KEY", "--writer-concurrency", "1",
                "--group-size", "2"]
        res = cli(args)
        assert res.exit_code == 0, res.output
        n_requests = len(ep.requests)
        # resume: every step's manifest matches, nothing is asked again
        res2 = cli(args)
        assert res2.exit_code == 0, res2.output
        assert len(ep.requests) == n_requests
    assert ep.headers[0]["Authorization"] == "Bearer secret-123"
    assert ep.requests[0]["model"] == "scripted" and ep.requests[0]["temperature"] == 0.0

    # step 1: one memory per graded attempt
    mem = pl.read_parquet(run_dir / "memories.parquet")
    assert mem.height == 8
    assert mem["outcome"].to_list() == ["success", "failure"] * 4
    assert mem["gold"].to_list() == attempts["answer"].to_list()
    assert all(p == g for p, g, c in zip(mem["pred"], mem["gold"], mem["correct"]) if c)

    # step 2: candidates, failures counted and kept with the raw reply
    cands = pl.read_parquet(run_dir / "candidates.parquet")
    per_reply = cands.unique("memory_id", keep="first", maintain_order=True)
    assert per_reply["parse_status"].to_list() == ["ok", "ok", "unparsable", "empty", "ok", "no_items", "ok", "no_items"]
    assert per_reply["raw"].to_list() == SCRIPT
    ok = cands.filter(pl.col("parse_status") == "ok")
    assert (ok["kind"] == "skill").sum() == 5 and (ok["kind"] == "mistake").sum() == 3  # 4th mistake capped
    counts = read_manifest(run_dir / "candidates.manifest.json")["counts"]
    assert counts["failed_replies"] == 4 and counts["parse_status"] == {"ok": 4, "unparsable": 1, "empty": 1, "no_items": 2}

    # step 3: merge (the scripted merger merges nothing -> 3 non-shrinking layers), dedupe, ids
    bank = load_bank(run_dir / "skill_bank.json")
    assert [s["title"] for s in bank.skills] == ["Check small cases", "Work backwards", "Reduce modulo early"]
    assert [s["skill_id"] for s in bank.skills] == ["gen_001", "gen_002", "gen_003"]
    assert [m["description"] for m in bank.mistakes] == [M1[0], M2[0], M3[0]]
    meta = bank.metadata
    assert meta["exact_duplicates_removed"] == 1 and meta["near_duplicates_removed"] == 1
    layers = meta["general_merge_layers"]
    assert [lay["stagnant_layers"] for lay in layers] == [1, 2, 3]
    assert layers[-1]["stopped_reason"] == "stagnation_patience_reached"
    # the Parquet bank is the same bank
    pq_bank = load_bank(run_dir / "skill_bank.parquet")
    assert pq_bank.to_json() == bank.to_json() and pq_bank.version == bank.version
    assert read_manifest(run_dir / "skill_bank.manifest.json")["bank_version"] == bank.version


def test_self_sampled_attempts_tiny_model(tiny, tiny_model_dir, tmp_path):
    """No --rollouts: mine-skills samples the tiny model itself; its attempts all fail -> mistakes only."""
    words = ["sign errors", "misread questions", "unchecked arithmetic", "missing cases", "wrong units"]
    with FakeEndpoint(extract=lambda p, i: mistakes_json((words[i], f"because of {words[i]}", f"avoid {words[i]}"))) as ep:
        cfg = MineSkillsConfig(writer=WriterConfig(url=ep.url, concurrency=2), model=str(tiny_model_dir),
                         problems=str(DEMO_PROBLEMS), n_problems=5, max_new_tokens=8, backend="hf", device="cpu",
                         dtype="fp32", seed=3)
        res = mine_run(cfg, tmp_path, loaded=tiny)
    roll = pl.read_parquet(tmp_path / "rollout.parquet")
    assert roll.height == 5 and roll["temperature"].to_list() == [1.0] * 5 and roll["top_p"][0] == 0.95
    assert len(set(roll["problem_id"])) == 5
    assert res.summary["memories"] == {"attempts": 5, "successes": 0}
    bank = load_bank(res.bank_json)
    assert bank.skills == [] and sorted(m["description"] for m in bank.mistakes) == sorted(words)
    sampled = [json.loads(line)["id"] for line in (tmp_path / "mine_problems.jsonl").read_text().splitlines()]
    assert sorted(sampled) == sorted(roll["problem_id"].to_list())


def test_local_writer_tiny_model_counts_failures(tiny, tmp_path):
    """The tiny random model as a local writer: garbage replies are counted, never fatal."""
    from stages.engine.generation.factory import make_backend

    model, tok, _ = tiny
    attempts = tiny_attempts(tiny, n=4)
    writer = LocalWriter(make_backend("hf", model=model, tokenizer=tok), tok, max_new_tokens=32, batch_size=4,
                         model_name="tiny")
    res = mine_run(MineSkillsConfig(), tmp_path, rollouts=_write(attempts, tmp_path / "r.parquet"), writer=writer)
    c = res.summary["candidates"]
    assert c["replies"] == 4 and c["failed_replies"] == 4 - c["parse_status"].get("ok", 0)
    assert sum(c["parse_status"].values()) == 4
    raw = pl.read_parquet(res.candidates)["raw"].to_list()
    assert all(isinstance(r, str) for r in raw)
    assert read_manifest(res.candidates.with_name("candidates.manifest.json"))["config"]["writer"]["model"] == "tiny"


def _write(df: pl.DataFrame, path):
    df.write_parquet(path)
    return path


def test_writer_timeout_is_one_line_exit_2(tiny, tmp_path):
    attempts = tiny_attempts(tiny, n=2)
    rpath = _write(attempts, tmp_path / "r.parquet")
    with FakeEndpoint(extract=lambda p, i: skills_json(S1), sleep_s=3.0) as ep:
        t0 = time.time()
        res = cli(["mine-skills", "--run-dir", str(tmp_path / "run"), "--rollouts", str(rpath), "--writer-url", ep.url,
                   "--writer-timeout", "0.3", "--writer-retries", "1"])
        elapsed = time.time() - t0
    assert res.exit_code == 2, res.output
    lines = error_lines(res)
    assert len(lines) == 1 and "timed out after 0.3 s (2 attempts)" in lines[0] and ep.url in lines[0], lines
    assert elapsed < 10
    assert not (tmp_path / "run" / "candidates.parquet").exists()
    assert (tmp_path / "run" / "memories.parquet").exists()  # step 1 is kept for the resume


def test_writer_http_error_and_retry(tmp_path):
    with FakeEndpoint(status=401) as ep:
        w = HTTPWriter(WriterConfig(url=ep.url, retries=3, backoff_s=0.01))
        with pytest.raises(InputError, match="HTTP 401"):
            w.complete(["hi"])
        assert len(ep.requests) == 1  # a 4xx is not retried
    with FakeEndpoint(status=503) as ep:
        w = HTTPWriter(WriterConfig(url=ep.url + "/chat/completions", retries=2, backoff_s=0.01))
        with pytest.raises(InputError, match="HTTP 503.*3 attempts"):
            w.complete(["hi"])
        assert len(ep.requests) == 3
    w = HTTPWriter(WriterConfig(url="http://127.0.0.1:9/v1", retries=0, timeout_s=2))
    with pytest.raises(InputError, match="unreachable|connection"):
        w.complete(["hi"])


def test_parse_json_reply_defensive():
    F = ("title", "principle", "when_to_apply")
    assert parse_json_reply(None, "general_skills", F) == ([], "empty")
    assert parse_json_reply("  \n", "general_skills", F) == ([], "empty")
    assert parse_json_reply("I cannot help with that.", "general_skills", F) == ([], "unparsable")
    items, st = parse_json_reply('Sure!\n{"general_skills": [{"title": " A ", "principle": "b\\n c", '
                                 '"when_to_apply": "d",},]}', "general_skills", F)  # trailing commas
    assert st == "ok" and items == [{"title": "A", "principle": "b c", "when_to_apply": "d"}]
    cut = skills_json(S1, S2)[:-30]  # cut off inside the second item: the first is kept
    items, st = parse_json_reply(cut, "general_skills", F)
    assert st == "ok" and [i["title"] for i in items] == [S1[0]]
    items, st = parse_json_reply("<think>\n{not json}\n</think>\n" + json.dumps([dict(zip(F, S2))]), "general_skills", F)
    assert st == "ok" and items[0]["title"] == S2[0]
    assert parse_json_reply('{"general_skills": [{"title": "x", "principle": 3}]}', "general_skills", F)[1] == "no_items"


class PairMerger(Writer):
    """In-process scripted writer: a merge keeps every second item (halves the group)."""

    name = "pair-merger"

    def __init__(self, bad_groups=()):
        self.calls = 0
        self.bad_groups = set(bad_groups)

    def complete(self, prompts, on_done=None):
        out = []
        for p in prompts:
            self.calls += 1
            items = merge_items_of(p)
            if self.calls in self.bad_groups:
                out.append("not json at all")
            else:
                out.append(json.dumps({merge_key(p): items[::2]}))
        return out


def test_hierarchical_merge_layers_and_failures():
    items = [{"title": f"t{i}", "principle": f"p{i}", "when_to_apply": f"w{i}"} for i in range(70)]
    w = PairMerger()
    out, layers, counters = hierarchical_merge(items, "skill", w, group_size=32, patience=3)
    assert [(lay["input_items"], lay["num_groups"], lay["output_items"]) for lay in layers] == [(70, 3, 35), (35, 2, 18), (18, 1, 9)]
    assert layers[-1]["stopped_reason"] == "root_group_reached" and len(out) == 9
    assert counters == {"merge_calls": 6, "merge_failures": 0}
    # an unusable reply keeps its group unchanged and is counted
    w = PairMerger(bad_groups={1})
    out, layers, counters = hierarchical_merge(items, "skill", w, group_size=32, patience=3)
    assert layers[0]["output_items"] == 32 + 16 + 3 and counters["merge_failures"] == 1
    assert hierarchical_merge([], "skill", w) == ([], [], {"merge_calls": 0, "merge_failures": 0})


def test_dedupe_and_excerpt():
    a = {"description": "Dropping a sign", "why_it_happens": "haste", "how_to_avoid": "rewrite"}
    b = {"description": "dropping  a SIGN", "why_it_happens": "Haste", "how_to_avoid": "rewrite"}
    c = {"description": "Dropping a sign.", "why_it_happens": "haste", "how_to_avoid": "rewrite!"}
    d = {"description": "Misreading the question", "why_it_happens": "speed", "how_to_avoid": "reread"}
    kept, n_exact, n_near = dedupe_items([a, b, c, d], "mistake", threshold=90)
    assert kept == [a, d] and (n_exact, n_near) == (1, 1)
    kept, _, _ = dedupe_items([c, d], "mistake", threshold=90, against=[a])
    assert kept == [d]
    assert excerpt("a  b\n c", 100) == "a b c"
    e = excerpt("x" * 50 + "y" * 50, 40)
    assert len(e) <= 40 and e.startswith("xxx") and e.endswith("yyy") and "[snip]" in e


def test_memories_use_given_grades():
    df = pl.DataFrame({"rollout_id": ["a#0", "b#0"], "problem": ["Solve the following math problem step by step. "
                       "The last line of your response should be of the form Answer: $Answer (without quotes) where "
                       "$Answer is the answer to the problem.\n\nWhat is 1+1?\n\nRemember to put your answer on its own "
                       "line after \"Answer:\".", "p2"], "answer": ["2", "3"], "completion": ["Answer: 2", "no idea"],
                       "correct": [True, False]})
    mem = build_memories(df, MiningParams(), grades=None)
    assert mem["outcome"].to_list() == ["success", "failure"]
    assert mem["problem"][0] == "What is 1+1?"  # DAPO wrapper stripped
    assert mem["problem_id"].to_list() == ["a", "b"] and mem["status"].to_list() == ["given", "given"]


def test_bad_rollouts_one_line(tmp_path):
    p = _write(pl.DataFrame({"problem": ["x"], "answer": ["1"]}), tmp_path / "r.parquet")
    res = cli(["mine-skills", "--run-dir", str(tmp_path / "run"), "--rollouts", str(p), "--writer-url", "http://127.0.0.1:9"])
    assert res.exit_code == 2 and len(error_lines(res)) == 1 and "missing column 'completion'" in res.output
    res = cli(["mine-skills", "--run-dir", str(tmp_path / "run2")])
    assert res.exit_code == 2 and "--model" in res.output


@pytest.mark.slow
def test_smollm2_writer_real_output(smollm2, tmp_path):
    """SmolLM2-135M-Instruct as the local writer on 2 attempts: whatever it writes is parsed or counted as a
    failure (plumbing only: the model is far too weak to be judged on content)."""
    from stages.engine.models import load_model

    loaded = load_model(str(smollm2), device="cpu", dtype="fp32")
    df = pl.DataFrame({
        "rollout_id": ["d0#0", "d1#0"],
        "problem": ["Compute $22 + 6$.", "What is the remainder when $2^{10}$ is divided by 7?"],
        "answer": ["28", "2"],
        "completion": ["22 + 6 = 28. The answer is \\boxed{28}.", "2^10 = 1024 = 7 * 146 + 3, so \\boxed{3}."],
        "correct": [True, False],  # a graded table: no verifier start-up in this test
    })
    cfg = MineSkillsConfig(writer=WriterConfig(model=str(smollm2), max_new_tokens=32, backend="hf", batch_size=2),
                     params=MiningParams(excerpt_chars=300))
    t0 = time.time()
    res = mine_run(cfg, tmp_path, rollouts=_write(df, tmp_path / "r.parquet"), loaded=loaded)
    wall = time.time() - t0
    c = res.summary["candidates"]
    assert res.summary["memories"] == {"attempts": 2, "successes": 1}
    assert c["replies"] == 2 and sum(c["parse_status"].values()) == 2
    cands = pl.read_parquet(res.candidates)
    from stages.engine.skills.bank import KINDS

    for kind, raw, status in cands.unique("memory_id", keep="first").select("kind", "raw", "parse_status").iter_rows():
        key, fields = KINDS[kind]
        assert status == parse_json_reply(raw, key, fields[1:])[1]  # the stored status is the parser's verdict
    bank = load_bank(res.bank_json)
    assert len(bank.skills) <= c["skills"] and len(bank.mistakes) <= c["mistakes"]
    print(f"smollm2 writer: {c} -> {len(bank.skills)} skills / {len(bank.mistakes)} mistakes in {wall:.1f} s")


def test_writer_drops_the_api_key_on_a_redirect_to_another_host(monkeypatch):
    """Issue 21: an endpoint that redirects elsewhere never receives the Authorization header there; a redirect
    inside the same endpoint keeps it."""
    from stages.engine.skills.writer import HTTPWriter, WriterConfig

    seen: dict[str, dict] = {}
    reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}]}).encode()

    class Target(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # urllib follows a 302 after a POST as a GET
            seen[self.path] = dict(self.headers)
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    other = ThreadingHTTPServer(("127.0.0.1", 0), Target)

    class Redirector(Target):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            where = (f"http://127.0.0.1:{other.server_address[1]}/elsewhere" if self.path.startswith("/away")
                     else "/v1/here")
            self.send_response(302)
            self.send_header("Location", where)
            self.send_header("Content-Length", "0")
            self.end_headers()

    home = ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    for srv in (other, home):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("SGSD_TEST_KEY", "sk-secret")
        for path in ("away", "v1"):
            w = HTTPWriter(WriterConfig(url=f"http://127.0.0.1:{home.server_address[1]}/{path}", key_env="SGSD_TEST_KEY",
                                        retries=0))
            assert w._request("hi") == "ok"
        assert "Authorization" not in seen["/elsewhere"] and "authorization" not in {k.lower() for k in seen["/elsewhere"]}
        assert seen["/v1/here"].get("Authorization") == "Bearer sk-secret"
    finally:
        for srv in (other, home):
            srv.shutdown()
            srv.server_close()
