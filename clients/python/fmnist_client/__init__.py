"""Python SDK for fmnist-service."""
