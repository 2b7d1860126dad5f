"""Generated gRPC/protobuf code for protos/nfctl/v1 (regenerate: `make protos`)."""
