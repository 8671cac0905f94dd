"""Test doubles that speak real network protocols (HTTP fakes of upstream backends)."""
