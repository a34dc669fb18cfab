"""Generated gRPC stubs of the zeroc.v1 protocol (protos/zeroc/v1). Regenerate with `make protos`."""
