"""spillgate.replica."""
