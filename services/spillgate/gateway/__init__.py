"""spillgate.gateway."""
