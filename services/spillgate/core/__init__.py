"""spillgate.core."""
