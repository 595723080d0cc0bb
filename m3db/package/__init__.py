"""The package layer: one read-only file holding a whole knowledge base (manifest, export, pack,
verify), opened as a read-only store, several at once. Uses storage's and search's public names
only (docs/architecture.md).
"""
