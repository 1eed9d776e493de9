"""spillgate.sim."""
