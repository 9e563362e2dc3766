"""The gateway process: HTTP and websocket routes, image intake, the result store. Never imports torch.

`app.gateway.main.create_app` builds the FastAPI application; `Gateway` (app.gateway.service) is the
runtime the routes share: it publishes requests to the broker and serves results back.
"""
