"""Generated protobuf code (do not edit; `make protos` regenerates it)."""
