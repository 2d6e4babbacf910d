"""Launch backends: `local` (worker processes) and `ray` (Ray Train); same worker code."""
