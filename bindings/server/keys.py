"""The API keys of a server of several knowledge bases (`m3db serve --kb NAME=PATH --keys FILE`):
a TOML file with one table per key, what it may read and write. The file holds the SHA-256 of
each secret, never the secret, so reading it (or a log that quotes it) gives no key away:

    [[keys]]
    name = "team-a"            # what logs and metrics may show, never the secret
    sha256 = "<hex SHA-256 of the secret>"   # printf %s SECRET | sha256sum
    read = ["wiki", "a"]       # knowledge bases this key may read
    write = ["a"]              # and write (a database served with --write; each also in read)

Everything is checked when the file is read, against the knowledge bases served, so a typo is
an error naming the key and the field at start (or on reload, which then keeps the keys it had).
"""

import dataclasses
import hashlib
import hmac
import re
import tomllib

from m3db.errors import InvalidInputError

FIELDS = ("name", "sha256", "read", "write")
HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    sha256: str  # lower-case hex
    read: frozenset
    write: frozenset


class Keys:
    """The keys of one reading of the file; `match` finds a secret's key."""

    def __init__(self, keys: list[Key]):
        self.keys = keys

    @classmethod
    def load(cls, path: str, served: dict[str, bool]) -> "Keys":
        """The keys file at `path`, checked against `served` ({name: writable})."""
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise InvalidInputError(f"cannot read the keys file {path!r}: {e.strerror or e}") from None
        return cls.parse(text, served, where=path)

    @classmethod
    def parse(cls, text: bytes, served: dict[str, bool], *, where: str = "the keys file") -> "Keys":
        try:
            doc = tomllib.loads(text.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InvalidInputError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidInputError(f"{where} is not valid TOML: {e}") from None
        extra = sorted(set(doc) - {"keys"})
        if extra:
            raise InvalidInputError(f"{where}: unknown table or field {extra[0]!r}; write each key as [[keys]]")
        tables = doc.get("keys")
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            raise InvalidInputError(
                f"{where} holds no key: write each as a [[keys]] table with name, sha256, read and write"
            )
        keys, names, digests = [], set(), set()
        for i, table in enumerate(tables):
            key = _key(table, f"{where}: keys[{i}]", served)
            if key.name in names:
                raise InvalidInputError(f"{where}: two keys are named {key.name!r}; give each its own name")
            if key.sha256 in digests:
                raise InvalidInputError(f"{where}: keys[{i}] ({key.name!r}) has the sha256 of an earlier key")
            names.add(key.name)
            digests.add(key.sha256)
            keys.append(key)
        return cls(keys)

    def match(self, secret: bytes) -> Key | None:
        """The key whose secret this is, or None. Every key is compared, in constant time, so the
        time taken says nothing about which key nearly matched."""
        digest = hashlib.sha256(secret).hexdigest().encode()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256.encode()):
                found = key
        return found


def _key(table: dict, what: str, served: dict[str, bool]) -> Key:
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise InvalidInputError(f"{what}: unknown field {unknown[0]!r}; a key has {', '.join(FIELDS)}")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip() or not name.isprintable():
        raise InvalidInputError(f"{what}: name must be a non-empty line of text (what logs show), got {name!r}")
    what = f"{what} ({name!r})"
    digest = table.get("sha256")
    if not isinstance(digest, str) or not HEX64.match(digest):
        raise InvalidInputError(
            f"{what}: sha256 must be the 64 hex digits of the secret's SHA-256 (printf %s SECRET | sha256sum), "
            "not the secret itself"
        )
    rights = {}
    for field in ("read", "write"):
        names = table.get(field, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidInputError(f"{what}: {field} must be a list of knowledge base names, got {names!r}")
        for n in names:
            if n not in served:
                raise InvalidInputError(
                    f"{what}: {field} names {n!r}, which this server does not serve (it serves "
                    f"{', '.join(sorted(served))})"
                )
        rights[field] = frozenset(names)
    if "read" not in table:
        raise InvalidInputError(f"{what}: read is missing; list the knowledge bases this key may read")
    for n in sorted(rights["write"]):
        if n not in rights["read"]:
            raise InvalidInputError(f"{what}: it may write {n!r} but not read it; add {n!r} to read")
        if not served[n]:
            raise InvalidInputError(
                f"{what}: it may write {n!r}, which is served read-only (a package, or a server without "
                "--write); serve it with --write or take it out of write"
            )
    return Key(name=name, sha256=digest.lower(), read=rights["read"], write=rights["write"])
