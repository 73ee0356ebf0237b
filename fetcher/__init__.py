"""fetcher: put a verified model next to its serving container."""

__version__ = "0.1.0"
