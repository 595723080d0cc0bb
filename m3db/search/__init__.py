"""The search layer: recall plans (ANN, exact, filtered over-fetch), filter caching, and the result
nouns. Uses storage's public names only (docs/architecture.md).
"""
