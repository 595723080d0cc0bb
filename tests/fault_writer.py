"""A writer process for the kill tests: adds batches of memories until killed.

Usage: python fault_writer.py PATH START. Prints "ready", then after each committed batch
"committed <first> <last>", flushed, so the parent knows what must survive a SIGKILL.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_memory, small_spec  # noqa: E402

import m3db  # noqa: E402

BATCH = 5


def main(path, start):
    spec = small_spec(codec="f32")
    with m3db.connect(path, spec=spec, config={"segment_size": 16384, "index_save_every": 40}) as db:
        print("ready", flush=True)
        seed = start
        while True:
            ids = db.add_memories([make_memory(s, spec, id=s) for s in range(seed, seed + BATCH)])
            print(f"committed {ids[0]} {ids[-1]}", flush=True)
            seed += BATCH


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
