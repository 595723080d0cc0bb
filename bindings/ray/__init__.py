"""m3db.bindings.ray: knowledge-base builds on Ray (`pip install 'm3db[ray]'`;
docs/distributed.md). The model's forward pass over every reference, the expensive part of a
build, runs in a pool of Ray actors; the database's single writer commits what they send back.

    from m3db.bindings.ray import build, build_shards, TransformersModels
    build("kb.m3db", documents, workers=4)                   # one database, one writer
    build_shards("shards/", documents, shards=8)             # eight packages, served together
    build("kb.m3db", documents, models=TransformersModels("path/to/model"))
    serve.run(replicas(["kb.m3kb"], replicas=2), route_prefix="/")   # the server's replicas (Ray Serve)

The rooms: `driver.py` (`build`, `build_shards`: the actor pool, the checks before it starts,
the reports), `models.py` (the picklable recipes each worker loads its model from:
`BundledModels`, `TransformersModels`, `TinyModels`), `worker.py` (`BatchEncoder`: a batch of
documents in, encoded memories out, and the msgpack wire format), `writer.py` (`commit_batch`:
one encoded batch in, one commit out, counted in a `BuildReport`), `replicas.py` (`replicas`:
the HTTP server's read-only replicas as a Ray Serve application, `m3db serve --ray`).

Imports: this package re-exports only. Its modules import ray, the engine's public names
(`m3db`, `m3db.errors`, `m3db.extend`) and `m3db.model`; importing it needs no ray (its verbs
say what to install) and no torch.
"""

from .driver import ShardReport, build, build_shards
from .models import BundledModels, TinyModels, TransformersModels
from .replicas import ServedKnowledgeBase, replicas
from .writer import BuildReport

__all__ = [
    "BuildReport",
    "BundledModels",
    "ServedKnowledgeBase",
    "ShardReport",
    "TinyModels",
    "TransformersModels",
    "build",
    "build_shards",
    "replicas",
]
