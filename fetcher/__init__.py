"""fetcher: put a verified model next to its serving container."""

__version__ = "0.1.0"

STATE_DIR = ".fetcher"  # fetcher's own state in every dest: never published, never unpacked into
