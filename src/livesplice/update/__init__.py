"""The update file: its format (the contract between create and apply), the signed archive,
signing keys and ``inspect``."""
