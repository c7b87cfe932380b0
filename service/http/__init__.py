"""The HTTP transport: what only HTTP needs, around the protocol-neutral core.

Each request's context (service/context.py) is built here from the ASGI scope (door.py),
bounded (limits.py), keyed (keys.py), recorded (record.py) and answered with the error
shape of its API (errors.py); the routers (service/routes/) decode the request's HTTP
form, call the data plane and encode its answer.
"""
