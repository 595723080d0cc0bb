"""Schemathesis over real `m3db serve` processes (issue 32): every operation of /openapi.json,
fuzzed from the document itself, on a `--write` server with an API key, on the same server
without the key, and on a read-only server without one; then stateful sequences along the
document's links (add documents -> read, search, SQL, forget -> read again). Every answer must
match the document (status, content type, headers, body, each event of a stream), no answer may
be a 5xx, no request may hang (each has a deadline), and what the document calls a valid body
the server's field tables must accept. After the runs both servers stop cleanly, their logs hold
no traceback, and the knowledge base the fuzzing wrote passes check().

The model is the tiny random decoder (tests/server_models.py) and --max-tokens 8, so a generation
takes milliseconds. The default run takes about a minute on two cores, deterministic
(a fixed seed); M3DB_SLOW=1 adds the long one: many more examples, longer sequences, seeded too,
so a run that passed passes again on the same code (exploring with random seeds is a separate
campaign, docs/fuzzing.md; what it finds becomes a test).
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("torch")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis.errors import FlakyFailure, FlakyStrategyDefinition  # noqa: E402
from schemathesis.specs.openapi import checks as st_checks  # noqa: E402

import m3db  # noqa: E402
from m3db.bindings.server.fields import parse  # noqa: E402
from m3db.bindings.server.memory import ADD_FIELDS, DOCUMENT_FIELDS, SEARCH_FIELDS, SQL_FIELDS  # noqa: E402
from m3db.bindings.server.openai import EMBEDDING_FIELDS, chat_fields, completion_fields  # noqa: E402
from tests.server_models import tiny  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

KEY = "test-key-0123456789"
TINY = ("--model", "tests.server_models:tiny")
DOCS = [
    {"text": "Zorblax is a small moon of the planet Quendor. Its capital city is Vell.", "source": "zorblax.txt"},
    {"text": "Bread is made from flour, water and yeast.", "source": "bread.txt", "metadata": {"lang": "en"}},
    {"text": "Berlin ist die Hauptstadt Deutschlands.", "source": "berlin.txt", "metadata": {"lang": "de"}},
]
MAX_TOKENS, MAX_QUEUE = 8, 8
LIMITS = ("--max-tokens", str(MAX_TOKENS), "--max-queue", str(MAX_QUEUE), "--sql-timeout", "10")
DEADLINE = 30  # seconds an answer may take: past it the request hangs, a failure

# the server's field tables, by operation: the document is made from them, so every body it
# calls valid must pass them (checked in this process, beside what the server answers)
TABLES = {
    "createChatCompletion": chat_fields(MAX_TOKENS),
    "createCompletion": completion_fields(MAX_TOKENS, MAX_QUEUE),
    "createEmbedding": EMBEDDING_FIELDS,
    "searchMemories": SEARCH_FIELDS,
    "addDocuments": ADD_FIELDS,
    "runSql": SQL_FIELDS,
}
# the codes of a 400 from the field tables (fields.py): a body the document calls valid must
# never get one (other 400s are about meaning: SQL that does not parse, a filter on an unknown
# column, a vector of the wrong length, a prompt over the context)
FIELD_CODES = {"invalid_type", "unknown_field", "missing_field", "unsupported_field", "invalid_json"}

# Schemathesis checks left out, each for its reason:
# - positive_data_acceptance wants a 2xx for every body the document allows, but a valid body
#   may still mean nothing (SQL that does not parse, a filter on an unknown column, a vector of
#   the wrong length, k over what the model reads): 400s by design. `field_tables_agree`
#   checks what the document does promise.
EXCLUDED = [st_checks.positive_data_acceptance]


def field_tables_agree(ctx, response, case):
    """A body the document calls valid passes the server's field tables, in this process and on
    the server (no 400 with a field-table code)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or st_checks.is_unexpected_http_status_case(case):
        return None
    operation_id = case.operation.definition.raw.get("operationId")
    if operation_id in TABLES and isinstance(case.body, dict):
        body = parse(case.body, TABLES[operation_id])
        for i, doc in enumerate(body.get("documents", [])):
            parse(doc, DOCUMENT_FIELDS, what=f"documents[{i}]")
    if response.status_code == 400:
        code = response.json()["error"]["code"]
        assert code not in FIELD_CODES, f"a body the document calls valid was refused by a field check: {response.text}"
    return None


def headers_for(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


# -- the servers --------------------------------------------------------------------------------


def build(path):
    model, embedder = tiny()
    with m3db.connect(path, model=model, embedder=embedder) as db:
        db.add_documents(DOCS, progress=False)
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A --write server with a key and a read-only one without, over two knowledge bases."""
    root = tmp_path_factory.mktemp("schemathesis")
    write = ServerProcess([build(root / "rw.m3db")], *TINY, *LIMITS, "--write", api_key=KEY)
    read_only = ServerProcess([build(root / "ro.m3db")], *TINY, *LIMITS)
    yield {"write": write, "read-only": read_only}
    logs = {}
    for name, server in (("write", write), ("read-only", read_only)):
        code = server.stop()
        logs[name] = server.output()
        server.close()
        assert code == 0, logs[name]
    for name, log in logs.items():
        assert "Traceback" not in log, f"the {name} server logged a traceback:\n{log[-5000:]}"
    with m3db.connect(root / "rw.m3db", read_only=True) as db:  # what the fuzzing wrote is sound
        report = db.check()
        assert report.ok, report


def load(server, *, deterministic=True, max_examples=None, phases=("examples", "coverage", "fuzzing"), modes="all"):
    """The server's document as Schemathesis reads it, its links' bodies taken whole (below)."""
    raw = httpx.get(server.url + "/openapi.json", headers=headers_for(server.api_key), timeout=DEADLINE).json()
    for item in raw["paths"].values():
        for op in item.values():
            for link in op["responses"]["200"].get("links", {}).values():
                if "requestBody" in link:  # a linked body is the whole body, not merged into a random one
                    link["x-schemathesis"] = {"merge_body": False}
    generation = {"deterministic": deterministic, "database": "none", "mode": modes}
    if max_examples is not None:
        generation["max-examples"] = max_examples
    config = schemathesis.Config.from_dict(
        {
            "base-url": server.url,
            "request-timeout": DEADLINE,
            "suppress-health-check": ["all"],
            "seed": 32,
            "generation": generation,
            "phases": {name: {"enabled": name in phases} for name in ("examples", "coverage", "fuzzing")},
        }
    )
    return schemathesis.openapi.from_dict(raw, config=config)


# -- every operation ------------------------------------------------------------------------------

# name: (server, whether the requests carry its key, examples per operation, phases)
RUNS = {
    "write": ("write", KEY, 80, ("examples", "coverage", "fuzzing")),
    "write-without-key": ("write", None, 8, ("fuzzing",)),
    "read-only": ("read-only", None, 30, ("examples", "fuzzing")),
}
LONG = 10  # the long run: this many times the examples, without derandomizing (still seed 32)


@pytest.fixture(params=list(RUNS))
def run(request, servers):
    name, key, examples, phases = RUNS[request.param]
    return request.param, key, load(servers[name], max_examples=examples, phases=phases)


@pytest.fixture(params=list(RUNS))
def long_run(request, servers):
    name, key, examples, phases = RUNS[request.param]
    return request.param, key, load(servers[name], max_examples=examples * LONG, phases=phases, deterministic=False)


@pytest.fixture
def api(run):
    return run[2]


@pytest.fixture
def long_api(long_run):
    return long_run[2]


@pytest.fixture(autouse=True)
def _node_id(request):
    # schemathesis 4.32's lazy loader renames the test node through `Node._nodeid`, which
    # pytest 9.2 no longer has: give it one to rename
    request.node._nodeid = request.node.nodeid


def check(case, run):
    name, key, _ = run
    response = case.call_and_validate(
        headers=headers_for(key), excluded_checks=EXCLUDED, additional_checks=[field_tables_agree], timeout=DEADLINE
    )
    if name == "write-without-key":  # every request, whatever its path or body, is refused first
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == ["Bearer"]


@schemathesis.pytest.from_fixture("api").parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation(case, run):
    check(case, run)


@pytest.mark.slow
@schemathesis.pytest.from_fixture("long_api").parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_long(case, long_run):
    check(case, long_run)


def test_the_document_is_valid_openapi(servers):
    for server in servers.values():
        raw = httpx.get(server.url + "/openapi.json", headers=headers_for(server.api_key), timeout=DEADLINE).json()
        schemathesis.openapi.from_dict(raw).validate()  # against the OpenAPI 3.1 meta-schema


def test_an_integer_may_be_sent_as_a_float(servers):
    """JSON Schema's integer takes 2.0, so the field tables do (it was a 400 invalid_type)."""
    body = parse({"model": "rw", "input": "x", "dimensions": 256.0}, EMBEDDING_FIELDS)
    assert body["dimensions"] == 256 and type(body["dimensions"]) is int
    with servers["write"].client() as http:
        r = http.post("/v1/completions", json={"model": "rw", "prompt": "The moon", "max_tokens": 2.0, "seed": 7.0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 2
        r = http.post("/v1/completions", json={"model": "rw", "prompt": "The moon", "max_tokens": 2.5})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_type", r.text


# -- stateful sequences ---------------------------------------------------------------------------


# the operations the links join (the others take no input from an answer)
LINKED = ["addDocuments", "searchMemories", "getMemory", "forgetMemory", "runSql"]


def workflow(server):
    """Schemathesis's state machine over the document's links (valid requests, with the key)."""
    schema = load(server, modes="positive").include(operation_id=LINKED)
    base = schema.as_state_machine()
    auth = headers_for(server.api_key)

    class Workflow(base):
        sequences = 0  # how many began (a class's: Hypothesis makes an instance per sequence)

        def setup(self):
            type(self).sequences += 1

        def get_call_kwargs(self, case):
            return {"headers": auth, "timeout": DEADLINE}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(
                response,
                additional_checks=[field_tables_agree],
                excluded_checks=EXCLUDED,
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    return Workflow


def run_sequences(machine, n: int, steps: int, seed: int | None) -> None:
    """n sequences of at most `steps` requests, new ones only (no shrinking: the server's state
    moves on, so a replayed sequence would not meet the same knowledge base)."""
    attempt = stalled = 0
    while machine.sequences < n:
        before = machine.sequences
        config = settings(
            max_examples=n - before,
            stateful_step_count=steps,
            phases=[Phase.generate],
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        try:
            (hypothesis.seed(seed + attempt)(machine) if seed is not None else machine).run(settings=config)
        except FlakyFailure as e:  # a failure seen once is a failure, reproduced or not
            raise e.exceptions[0] from e
        except FlakyStrategyDefinition:
            # Hypothesis met a choice it had seen answered otherwise (the knowledge base changed
            # under it, so a rule that could run no longer can): the sequences so far passed, and
            # the run goes on from another seed, as Schemathesis's own runner does
            pass
        attempt += 1
        stalled = stalled + 1 if machine.sequences == before else 0
        assert stalled < 3, f"no new sequence in 3 tries, {machine.sequences} of {n} ran"


def test_stateful_sequences(servers):
    run_sequences(workflow(servers["write"]), 50, 12, seed=32)


@pytest.mark.slow
def test_stateful_sequences_long(servers):
    run_sequences(workflow(servers["write"]), 300, 20, seed=1032)
