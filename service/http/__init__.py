"""The HTTP transport: what only HTTP needs, around the protocol-neutral core.

One middleware (middleware.py) takes every request: its context (service/context.py) is
built from the ASGI scope and admitted at the door (door.py), keyed (keys.py), bounded
(limits.py) and recorded (record.py), and answered with the error shape of its API
(errors.py); the routers (service/routes/) decode the request's HTTP form, call the data
plane and encode its answer.
"""
