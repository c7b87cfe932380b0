"""The columns of the Parquet files the product writes, in one place: the service's
payload log (service/payloads.py writes it, `python -m training report --traffic` reads
it) and the score job's input and output (score/).

Writers build their tables with these schemas and readers read with them, so a column
renamed on one side fails loudly on the other instead of reading as missing. pyarrow is
imported with this module: import it where Parquet is written or read, not before.
"""

import pyarrow as pa

from contract.modelcard import IMAGE_SIZE

PIXEL_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3

# One row per logged image: the pixels as the model saw them and its answer.
PAYLOAD_SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("ms", "UTC")),
        ("request_id", pa.string()),
        ("route", pa.string()),  # a route template, or the gRPC method's full name
        ("image", pa.int32()),  # its position in the request
        ("model_id", pa.string()),
        ("model_version", pa.string()),
        # uint8 [32, 32, 3], row-major: np.frombuffer(value, np.uint8).reshape(32, 32, 3)
        ("pixels", pa.binary(PIXEL_BYTES)),
        ("top_classes", pa.list_(pa.int16())),  # best first
        ("top_labels", pa.list_(pa.string())),
        ("top_probabilities", pa.list_(pa.float32())),
        ("familiarity", pa.float32()),  # null where the file has no familiarity output
        # Added with shadow rollouts; a shard written before them reads these as null
        # (read with this schema). The version's time for the request, hand-over to answer:
        ("latency_ms", pa.float32()),
        # A shadow candidate's answer to the same image (service/shadow.py); null unless
        # the request was shadowed. Its class names are the model's, as above.
        ("candidate_version", pa.string()),
        ("candidate_top_classes", pa.list_(pa.int16())),
        ("candidate_top_probabilities", pa.list_(pa.float32())),
        ("candidate_familiarity", pa.float32()),
        ("candidate_latency_ms", pa.float32()),
    ]
)

# The score job's input: one row per image, its bytes read by the actor (`path`), or its
# pixels already decoded (`pixels`, uint8 32x32x3 row-major: CIFAR-100's pickles).
SCORE_INPUT_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("index", pa.int64()), ("path", pa.string()), ("pixels", pa.binary())]
)


def score_output_schema(features: bool) -> pa.Schema:
    """The score job's output, one row per image: /predict's answer flattened into
    columns, or an error."""
    fields = [
        ("shard", pa.int32()),
        ("index", pa.int64()),
        ("path", pa.string()),
        ("model_id", pa.string()),
        ("model_version", pa.string()),
        ("top_k_ids", pa.list_(pa.int32())),
        ("top_k_labels", pa.list_(pa.string())),
        ("top_k_probabilities", pa.list_(pa.float32())),
        ("superclass_id", pa.int32()),
        ("superclass", pa.string()),
        ("superclass_probability", pa.float32()),
        ("familiarity", pa.float32()),  # null where the file has no familiarity output
    ]
    if features:
        fields.append(("features", pa.list_(pa.float32())))
    fields.append(("error", pa.string()))  # null on success; then every answer column is null
    return pa.schema(fields)
