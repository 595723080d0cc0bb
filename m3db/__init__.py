"""m3db: an embedded database for the explicit memory of language models."""
