"""Controller: what `run`, `create`, `restart` and friends do, built on engines and storage."""
