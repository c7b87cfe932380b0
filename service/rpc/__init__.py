"""The gRPC transport: the Open Inference Protocol's `inference.GRPCInferenceService`.

inference.proto declares what is served (wire-compatible with Triton's and KServe's
definitions); inference_pb2*.py are generated from it and committed (the command is in
the .proto); servicer.py turns each RPC into a call on the data plane; server.py starts
and stops the server beside HTTP, with its bounds.
"""
