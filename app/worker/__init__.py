"""The worker process: consumes requests, runs batched inference, publishes results.

The only part of `app` that imports torch (app.worker.consumer); the health responder is torch-free.
"""
