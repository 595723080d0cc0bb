"""The memory cache: decoded memories kept in RAM, bounded in bytes, least recently used out.

Neighbouring chunks of a prompt, and successive questions, recall many of the same memories
(the paper keeps such a cache for the same reason); decoding one from its segment costs a
checksum, a decompression and a dequantization. Cached arrays are read-only, because every
reader shares them. The database drops an entry the moment its memory is forgotten.
"""

import collections
import threading

from .record import Memory


class MemoryCache:
    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._items = collections.OrderedDict()  # id -> (Memory, bytes)
        self._lock = threading.Lock()

    def get(self, memory_id) -> Memory | None:
        with self._lock:
            entry = self._items.get(memory_id)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(memory_id)
            self.hits += 1
            return entry[0]

    def put(self, memory) -> None:
        size = memory.keys.nbytes + memory.values.nbytes + memory.positions.nbytes + len(memory.text) + 200
        if size > self.max_bytes:
            return
        for arr in (memory.keys, memory.values, memory.positions):
            arr.flags.writeable = False
        with self._lock:
            old = self._items.pop(memory.id, None)
            if old is not None:
                self.nbytes -= old[1]
            self._items[memory.id] = (memory, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.nbytes -= evicted

    def discard(self, ids) -> None:
        with self._lock:
            for i in ids:
                entry = self._items.pop(int(i), None)
                if entry is not None:
                    self.nbytes -= entry[1]

    def __len__(self):
        return len(self._items)
