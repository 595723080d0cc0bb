"""m3db.bindings.ray: knowledge-base builds on Ray (`pip install 'm3db[ray]'`;
docs/distributed.md). The model's forward pass over every reference, the expensive part of a
build, runs in a pool of Ray actors; the database's single writer commits what they send back.

    from m3db.bindings.ray import build, build_shards
    build("kb.m3db", documents, workers=4)                   # one database, one writer
    build_shards("shards/", documents, shards=8)             # eight packages, served together

The rooms: `driver.py` (`build`, `build_shards`: the actor pool and the checks before it
starts), `worker.py` (the model recipes, a worker's half and the writer's half).

Imports: this package re-exports only.
"""

from .driver import ShardReport, build, build_shards
from .worker import BuildReport, BundledModels, TinyModels, TransformersModels

__all__ = ["BuildReport", "BundledModels", "ShardReport", "TinyModels", "TransformersModels", "build", "build_shards"]
