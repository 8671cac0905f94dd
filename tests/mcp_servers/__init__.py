"""MCP servers written for the tests with the SDK's own server API (run as processes)."""
