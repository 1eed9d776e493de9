"""spillgate.registry."""
