"""spillgate.controlplane."""
