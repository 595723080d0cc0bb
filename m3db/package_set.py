"""`PackageSet`: several packages attached to one connection, with the verbs of a Database that
read: recall (by text or vector), get, sql, and generate, whose answers read memories from every
package and name the package of each source. `m3db.attach([...])` and `m3db.connect([...])`
return one; the HTTP server serves one the same way.

It composes read-only Databases (one per package, opened by m3db.database.attach), so it sits
beside the facade. Imports: the package layer's merge, the knowledge layer's answer plan.
"""

import numpy as np

from .errors import ClosedError, NotFoundError
from .knowledge.answer import Answer, AnswerPlan
from .package.multi import PackageMatches, merge_recalls
from .storage.record import Memory


class PackageSet:
    """Packages attached to one connection: recalled together, merged by score.

    `packages` maps each name to its read-only Database. All share one memory spec (`spec`)
    and one model: the first package's, which every other was checked against when attached.
    """

    def __init__(self, packages):
        self.packages = dict(packages)
        first = next(iter(self.packages.items()), None)
        self.spec = first[1].spec if first else None

    @property
    def names(self) -> list[str]:
        return list(self.packages)

    @property
    def primary(self):
        """The first package's Database: its model and embedder serve the whole set."""
        return next(iter(self.packages.values()))

    @property
    def closed(self) -> bool:
        return all(db.closed for db in self.packages.values())

    def models(self) -> tuple[object, object]:
        """(model, embedder) the set reads with (see Database.models)."""
        return self.primary.models()

    def embed_query(self, text) -> np.ndarray:
        """The retrieval vector of a query text (the embedder every package shares)."""
        return self.primary.embed_query(text)

    def recall(self, query, k=5, where=None, params=None, *, decode=False, margin=None) -> PackageMatches:
        """The k memories nearest `query` (a text, embedded once, or a vector) across every
        package, best first (PackageMatches).

        Each package is recalled with the same k and filter (see Database.recall), then the
        results are merged by score; ties go to the package attached first, then the lower id.
        """
        if isinstance(query, str):
            query = self.embed_query(query)
        return merge_recalls(self.packages, query, k, where, params, decode=decode, margin=margin)

    def generate(self, prompt, **options) -> Answer:
        """Answer `prompt` reading memories recalled from every package: the options of
        Database.generate (max_tokens, memory, k, where, params, temperature, top_p,
        stop_tokens, seed, raw), the same plan. Each source names its `package`; each chunk's
        memory ids are (package, id) pairs."""
        if self.closed:
            raise ClosedError("these packages are closed; attach() them again to use them")
        choice = {name: options.pop(name) for name in ("memory", "k", "where", "params", "margin") if name in options}
        return AnswerPlan(self, self.models()[0], **choice).generate(prompt, **options)

    def documents_of(self, matches) -> list[tuple[str | None, str | None]]:
        """(source, title) of each match's document, each from its own package."""
        out = {}
        for name in {m.package for m in matches}:
            mine = [m for m in matches if m.package == name]
            out.update(zip((id(m) for m in mine), self.package(name).documents_of(mine)))
        return [out[id(m)] for m in matches]

    def get(self, package, memory_id) -> Memory:
        """The memory `memory_id` of the package named `package`, decoded."""
        return self.package(package).get(memory_id)

    def sql(self, package, query, params=None) -> list[tuple[object, ...]]:
        """One read-only SQL statement over the catalog of the package named `package`."""
        return self.package(package).sql(query, params)

    def package(self, name):
        """The read-only Database of the package attached as `name`."""
        if name not in self.packages:
            raise NotFoundError(f"no package named {name!r} is attached; attached: {', '.join(self.packages)}")
        return self.packages[name]

    def __len__(self):
        return sum(len(db) for db in self.packages.values())

    def close(self) -> None:
        for db in self.packages.values():
            if not db.closed:
                db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<m3db.PackageSet {', '.join(f'{n}={len(db)}' for n, db in self.packages.items())}>"
