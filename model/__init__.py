"""m3db.model: the bundled memory-augmented decoder (PyTorch)."""
