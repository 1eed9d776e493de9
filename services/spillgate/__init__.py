"""spillgate: route inference requests to the closest GPU pool that can meet the SLA."""

__version__ = "0.1.0"
