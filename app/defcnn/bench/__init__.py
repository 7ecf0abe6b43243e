"""`defcnn bench`: load and reliability benchmarks against a local server."""
