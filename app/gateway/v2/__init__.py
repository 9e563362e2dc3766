"""The Open Inference Protocol (KServe v2) over REST (`app.gateway.v2.rest`) and gRPC (`app.gateway.v2.grpc_server`).

Both parse their tensors (`app.gateway.v2.tensors`) and hand them to one path (`app.gateway.v2.inference`):
the gateway's registry, image policy, submit, broker and result store, as `/v1` uses them.
"""
