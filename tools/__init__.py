"""Development tools, not installed with fastnest: the AOT GPU-readiness driver and its kernel configurations,
and the plain references and synthetic batches that tests/ and bench/ share. Import from the repository root."""
