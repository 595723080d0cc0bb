"""A process for the cold-start kill test: encodes a cold knowledge base's memories one at a
time until killed.

Usage: python cold_warmer.py PATH. Prints "ready", then "warmed <id>" after each memory's
first encoding is kept, flushed, so the parent knows what must survive a SIGKILL.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_knowledge import HashEmbedder  # noqa: E402

import m3db  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402


def main(path):
    with m3db.connect(path, model=MemoryModel.tiny(), embedder=HashEmbedder()) as db:
        print("ready", flush=True)
        for (mid,) in db.sql("SELECT id FROM memories WHERE codec = 'cold' ORDER BY id"):
            db.get(mid)
            print(f"warmed {mid}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
