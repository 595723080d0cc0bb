"""Cold memories: stored as text and embedding only, encoded by the bound model on first read.

`warm(...)` encodes a batch of cold memories and returns them decoded. A writable database
keeps them: the writer relocates the memories onto their full records (append, fsync, then
one catalog transaction; a crash in between leaves bytes that recovery cuts). A read-only one
(or one inside a transaction) keeps them in the RAM cache only. `warm_up` encodes every cold
memory of a database now (before packing, say). Imports: errors, progress and storage's
record format.
"""

from ..errors import InvalidInputError, SpecMismatchError
from ..progress import progress_bar
from ..storage.record import REPAIR_FIELDS, decode_record, encode_record


def warm(db, memories, *, cache=True) -> dict:
    """Encode cold `memories` with the database's model; return {id: Memory}, read back from the
    encoded records so a warmed memory equals every later read of it."""
    try:
        model, _ = db.models()
    except SpecMismatchError as e:
        raise SpecMismatchError(
            f"memory {memories[0].id} is cold (stored as text, encoded on first read) and encoding it needs the "
            f"model that built this database: {e}"
        ) from e
    store = db.store
    encoded = model.encode([m.text for m in memories])
    blobs, warmed = [], {}
    for m, e in zip(memories, encoded):
        keys, values, positions = store.spec.check_arrays(e["keys"], e["values"], e["positions"])
        store.codec.check(keys), store.codec.check(values)
        token_count = m.token_count if m.token_count is not None else int(e["token_count"])
        cold = store.read_payload(m.id)  # its embedding, commit and document go on into the new record
        blob = encode_record(
            m.id,
            store.codec,
            keys,
            values,
            positions,
            m.text,
            m.metadata,
            m.document_id,
            m.ordinal,
            token_count,
            repair={key: cold[key] for key in REPAIR_FIELDS if key in cold},
        )
        blobs.append(blob)
        warmed[m.id] = decode_record(blob, f"memory {m.id}", codec=store.codec)
    if not store.read_only and not db.writer.depth:
        db.writer.relocate(list(warmed), blobs, store.codec.name)
    if cache:
        for memory in warmed.values():
            store.cache.put(memory)
    return warmed


def warm_up(db, *, batch_size=16, progress=True) -> int:
    """See Database.warm_up."""
    db.require_writable()
    if db.writer.depth:
        raise InvalidInputError("warm_up() cannot run inside a transaction; call it after the transaction")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    ids = db.catalog.cold_ids().tolist()
    bar = progress_bar(progress, "memories", total=len(ids))
    try:
        for start in range(0, len(ids), batch_size):
            batch = [db.store.read(i) for i in ids[start : start + batch_size]]
            warm(db, batch, cache=False)
            bar.update(len(batch))
    finally:
        bar.close()
    return len(ids)
