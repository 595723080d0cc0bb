"""The knowledge layer: text in, answers out, through the model protocol (protocols.py): chunking,
sources, ingest, cold memories, generation, the bundled model, the leakage filter. Uses storage's
public names only; the model package (torch) is imported lazily (docs/architecture.md).
"""
