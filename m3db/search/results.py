"""The result nouns of a recall: `Match` (one recalled memory) and `Matches` (best first, with
the plan that found them). Plain data: imports nothing of m3db.
"""

import dataclasses


@dataclasses.dataclass
class Match:
    """One recalled memory: its id, cosine similarity, text and metadata (and `memory`, the
    decoded arrays, when recall was asked to decode)."""

    id: int
    score: float
    text: str
    metadata: dict
    document_id: int | None = None
    memory: object = None

    def __repr__(self):
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return f"<Match id={self.id} score={self.score:.4f} text={text!r}>"


class Matches(list):
    """The result of recall: Match objects, best first, plus `plan` (how it was searched) and
    `read_seconds` (of the recall's time, what reading the memories took)."""

    def __init__(self, matches=(), plan=None, read_seconds=0.0):
        super().__init__(matches)
        self.plan = plan or {}
        self.read_seconds = read_seconds

    @property
    def ids(self) -> list[int]:
        return [m.id for m in self]

    @property
    def scores(self) -> list[float]:
        return [m.score for m in self]

    def to_list(self) -> list[dict[str, object]]:
        return [
            {"id": m.id, "score": m.score, "text": m.text, "metadata": m.metadata, "document_id": m.document_id}
            for m in self
        ]

    def __repr__(self):
        return f"<Matches {len(self)} ids={self.ids} plan={self.plan.get('strategy')}>"
