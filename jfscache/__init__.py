"""jfscache: a FUSE caching filesystem over Redis metadata and object-store blocks."""
__version__ = "0.1.0"
