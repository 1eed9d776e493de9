"""spillgate.fleet."""
