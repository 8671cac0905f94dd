"""Generated code of the toolchain.v1 contract; see protos/generate.py."""
