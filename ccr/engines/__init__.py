"""Engines: the things that act on processes and images (CRIU, process launch, compression)."""
