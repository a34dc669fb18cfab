"""`zeroc serve gateway`: an OpenAI-compatible HTTP API in front of the gRPC decode services.

schemas.py (request bodies, checked), errors.py (OpenAI-shaped errors and the gRPC status map),
chat.py (the model directory's chat template, rendered as Hugging Face does), replicas.py (the
decode services behind the SDK, round-robin with failover), app.py (the FastAPI routes and
server-sent events), command.py (flags, `ZEROC_GATEWAY_*` settings, the uvicorn process),
bench.py (`zeroc bench gateway`: the same load through the gateway and through gRPC, side by side).
"""
