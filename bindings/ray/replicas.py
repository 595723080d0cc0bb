"""Replicas of the HTTP server on Ray Serve (`m3db serve PATH --ray --replicas N`, or `replicas()`
from Python): N copies of the app of m3db.bindings.server, each in a Ray actor of its own with
its own decoder and its own read-only view of the knowledge base, behind Ray Serve's proxy,
which spreads requests over them and starts a new replica when one dies.

    from ray import serve
    from m3db.bindings.ray import replicas
    serve.run(replicas(["kb.m3kb"], replicas=2), route_prefix="/")   # http://127.0.0.1:8000/v1

Read-only, by design: a database has one writer (docs/engine.md), and N replicas writing would
be N writers. So a replica opens its database read-only (or attaches packages), every write
endpoint answers 403 `read_only` on every replica, and `m3db serve --ray --write` is refused:
writes go to one `m3db serve --write` process of their own, whose commits a replica sees when it
starts (a restart of the deployment picks them up).

A replica is built from a recipe (`ServedKnowledgeBase`: the paths, the model recipe, the
server's options), not from an open database: each replica opens its own, on whatever node Ray
places it, where the same paths must hold the same files. Imports: ray (inside `replicas`), the
server binding, the engine's public names.
"""

import dataclasses
import os

import m3db
from m3db.errors import DependencyError, InvalidInputError

__all__ = ["ServedKnowledgeBase", "replicas"]


@dataclasses.dataclass(frozen=True)
class ServedKnowledgeBase:
    """What a replica serves: a database or package (several packages: attached together), read
    with the model `models` returns (a recipe such as BundledModels(), TinyModels(), or a
    callable taking the database's MemorySpec and returning (model, embedder); None: the bundled
    model), under the server's options (bindings/server app())."""

    paths: tuple
    models: object = None
    name: str | None = None
    api_key: str | None = None
    limits: dict = dataclasses.field(default_factory=dict)
    precision: str | None = None
    public_metrics: bool = False

    def open(self):
        paths = list(self.paths)
        model = embedder = None
        if self.models is not None:
            with _open(paths) as peek:
                model, embedder = self.models(peek.spec)
        return _open(paths, model=model, embedder=embedder, precision=self.precision)

    def app(self, db):
        import m3db.bindings.server as server  # the server binding, through its package

        return server.app(
            db,
            name=self.name,
            api_key=self.api_key,
            write=False,
            limits=server.Limits(**self.limits),
            public_metrics=self.public_metrics,
        )


def _open(paths, **kw):
    if len(paths) > 1:
        return m3db.attach(paths, **kw)
    return m3db.connect(paths[0], read_only=True, **kw)


class Replica:
    """One replica: its own database, opened read-only, and the server's app over it."""

    def __init__(self, served: ServedKnowledgeBase):
        self.served = served
        self.db = served.open()

    def __serve_build_asgi_app__(self):  # Ray Serve asks for the app after __init__
        return self.served.app(self.db)

    def __del__(self):  # a replica Ray Serve stops (not one killed) closes its database
        db = getattr(self, "db", None)
        if db is not None:
            db.close()


def replicas(
    paths,
    *,
    replicas: int = 2,
    models=None,
    name: str | None = None,
    api_key: str | None = None,
    limits=None,
    precision: str | None = None,
    public_metrics: bool = False,
    cpus_per_replica: float = 1.0,
):
    """The Ray Serve application of `replicas` copies of the server over the knowledge base at
    `paths` (a database or package; several packages attached together), for `serve.run`.
    models, name, api_key, limits (a bindings.server Limits), precision, public_metrics: as
    `m3db serve` takes them (ServedKnowledgeBase). cpus_per_replica: Ray CPUs each replica
    holds (a replica decodes on torch's threads whatever Ray counts)."""
    try:
        from ray import serve
    except ImportError as e:
        raise DependencyError(f"replicas need Ray Serve ({e}): pip install 'm3db[ray]'") from e
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise InvalidInputError("replicas() serves a database or package: give its path")
    for path in paths:
        if not os.path.exists(path):
            raise InvalidInputError(f"no database or package at {str(path)!r}; check the path")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise InvalidInputError(f"replicas must be a positive integer, got {replicas!r}")
    if not (isinstance(cpus_per_replica, (int, float)) and cpus_per_replica >= 0):
        raise InvalidInputError(f"cpus_per_replica must be a number >= 0, got {cpus_per_replica!r}")
    fields = {} if limits is None else dataclasses.asdict(limits)
    served = ServedKnowledgeBase(
        paths=tuple(os.path.abspath(p) for p in paths),
        models=models,
        name=name,
        api_key=api_key,
        limits=fields,
        precision=precision,
        public_metrics=public_metrics,
    )
    deployment = serve.deployment(
        serve.ingress()(Replica),
        name="m3db",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        # as many requests per replica as its generation queue takes; more wait in Serve's proxy
        max_ongoing_requests=fields.get("max_queue", 64),
    )
    return deployment.bind(served)
