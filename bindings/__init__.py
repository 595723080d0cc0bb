"""m3db.bindings: adapters to other ecosystems (none yet)."""
