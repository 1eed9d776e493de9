"""spillgate.admission."""
