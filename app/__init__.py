"""fmnist-service: the HTTP gateway, the worker process, settings and the `fmnist` CLI."""

__version__ = "0.1.0"
