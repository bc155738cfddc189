"""Storage: checkpoint image layout and manifests, and the job registry."""
