"""The gateway's HTTP and websocket routes, and the runtime (`Gateway`) they share."""
