"""The storage layer: records, codecs, the memory spec, segments, the catalog, the vector index,
the commit protocol (store, writer), input checks and maintenance. Imports nothing above it
(docs/architecture.md); every other layer uses its public names only.
"""
