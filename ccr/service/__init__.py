"""The per-node ccr service: users other than root reach ccr through it (see README)."""
