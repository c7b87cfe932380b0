"""Response bodies of the API, with the examples shown in /docs."""

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from contract.classifier import Classifier
from contract.modelcard import superclass_probabilities
from service.outputs import top_classes


class ClassScore(BaseModel):
    class_id: int = Field(examples=[3])
    label: str = Field(examples=["bear"])
    superclass: str = Field(examples=["large_carnivores"])
    probability: float = Field(examples=[0.71])


class SuperclassScore(BaseModel):
    superclass_id: int = Field(examples=[8])
    label: str = Field(examples=["large_carnivores"])
    probability: float = Field(
        description="sum of the fine probabilities of the superclass's classes", examples=[0.86]
    )


class ImagePrediction(BaseModel):
    filename: str | None = Field(examples=["bear.png"])
    top_k: list[ClassScore] = Field(description="most probable fine classes, best first")
    superclass: SuperclassScore = Field(description="most probable of the 20 superclasses")
    familiarity: float | None = Field(
        None,
        description="share of the validation images less like the training data than this "
        "one: 0.01 is stranger than 99 % of them (null: the model has no familiarity output)",
        examples=[0.42],
    )


class PredictResponse(BaseModel):
    model_id: str = Field(examples=["cifar100-5735844"])
    model_version: str = Field(
        description="content hash of the model file that answered", examples=["3f2a9c61d0b4"]
    )
    inference_ms: float = Field(
        description="from handing the images to the model until its probabilities came back, "
        "micro-batching wait included",
        examples=[3.2],
    )
    predictions: list[ImagePrediction] = Field(description="one per uploaded image, in order")


# Fine classes per image unless asked otherwise: /predict's top_k, the score job's --top-k.
DEFAULT_TOP_K = 5


def describe(
    model: Classifier,
    probabilities: np.ndarray,
    top_k: int,
    filename: str | None,
    familiarity: float | None = None,
) -> ImagePrediction:
    """One image's probabilities as the API reports them."""
    card = model.card
    best = top_classes(probabilities, top_k)
    superclasses = superclass_probabilities(probabilities, card.fine_to_coarse)
    top_super = int(superclasses.argmax())
    return ImagePrediction(
        filename=filename,
        top_k=[
            ClassScore(
                class_id=int(i),
                label=card.class_names[i],
                superclass=card.superclass_names[card.fine_to_coarse[i]],
                probability=float(probabilities[i]),
            )
            for i in best
        ],
        superclass=SuperclassScore(
            superclass_id=top_super,
            label=card.superclass_names[top_super],
            probability=float(superclasses[top_super]),
        ),
        familiarity=familiarity,
    )


class ImageExplanation(BaseModel):
    filename: str | None = Field(examples=["bear.png"])
    class_id: int = Field(description="the class explained", examples=[3])
    label: str = Field(examples=["bear"])
    probability: float = Field(description="its probability on the image itself")
    patch: int = Field(description="side of the grey square slid over the image (pixels)")
    stride: int = Field(description="step between its positions (pixels)")
    heat_map: list[list[float]] = Field(
        description="32 rows of 32: at each pixel, how much covering it lowered the class's "
        "probability (mean over the positions that covered it; negative: covering it helped)"
    )


class ExplainResponse(BaseModel):
    model_id: str = Field(examples=["cifar100-5735844"])
    model_version: str = Field(examples=["3f2a9c61d0b4"])
    inference_ms: float = Field(description="the occluded copies' wait and inference")
    explanations: list[ImageExplanation] = Field(description="one per image, in order")


class Serving(BaseModel):
    """What computes a file here (contract/engines.py), chosen when it loaded."""

    engine: str = Field(examples=["openvino"])
    engine_version: str = Field(examples=["2026.4.1"])
    precision: str = Field(
        description="float32, bfloat16, int8 or float16: what the file is computed in",
        examples=["bfloat16"],
    )
    device: str = Field(description="cpu or cuda", examples=["cpu"])
    instructions: str | None = Field(
        description="the CPU instructions that precision runs on here (AMX, AVX-512 BF16, "
        "AVX-512, AVX2, an int8 kernel class), or CUDA",
        examples=["AMX"],
    )
    provider: str | None = Field(
        None, description="onnxruntime's execution provider (onnxruntime only)",
        examples=["CPUExecutionProvider"],
    )  # fmt: skip
    declined: list[str] = Field(
        description="faster ways this machine offers that do not serve it, and why (not "
        "asked for, no promise for that precision, the promise failed here)",
        examples=[["openvino bfloat16 on the CPU: this CPU has no bfloat16 instructions"]],
    )


class ModelInfo(BaseModel):
    model_id: str = Field(examples=["cifar100-5735844"])
    version: str = Field(
        description="content hash of the file: which weights answer", examples=["3f2a9c61d0b4"]
    )
    trained_at: str = Field(
        description="from the model card (else the file's time); the newest version of a "
        "model is its default",
        examples=["2026-11-28T17:04:00Z"],
    )
    file: str = Field(examples=["cifar100-5735844.onnx"])
    serving: Serving
    provenance: str = Field(
        description='"verified by <key fingerprint>": its signature bundle was verified with '
        'that TRUSTED_KEYS key for the bytes loaded; "not verified": TRUSTED_KEYS is unset',
        examples=["verified by sha256:4c1f0e9a7b2d3c58"],
    )
    ready: bool
    default: bool = Field(
        description="used when /predict is called without `model` (and `version`)"
    )
    parameter_count: int = Field(examples=[5735844])
    evaluation: dict[str, Any] | None = Field(description="test-set numbers from training")


class ModelDetail(ModelInfo):
    class_names: list[str]
    superclass_names: list[str]
    fine_to_coarse: list[int] = Field(description="superclass index of each fine class")
    training: dict[str, Any] = Field(description="recipe, or where the weights came from")
    familiarity: dict[str, Any] | None = Field(
        default=None,
        description="which strangeness score the familiarity output calibrates (`score`, "
        "`method`), fitted and calibrated on how many images; null: the file has none",
    )


class ModelList(BaseModel):
    default_model: str | None
    models: list[ModelInfo]
    failed: dict[str, str] = Field(description=".onnx files that could not be served, and why")


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    detail: str | None = None


class RolloutChange(BaseModel):
    """A candidate version to try beside the serving one."""

    candidate: str = Field(description="a loaded version of the model (its content hash)")
    mode: Literal["shadow", "canary"] = Field(
        description="shadow: copies of live requests, answered after the fact, compared; "
        "canary: this share of callers is answered by the candidate"
    )
    share: float = Field(ge=0, le=1, description="of requests shadowed, or of callers answered")
    serving: str | None = Field(
        None, description="the version to keep serving; default: the one serving now"
    )


class RolloutState(BaseModel):
    model_id: str
    serving: str = Field(description="the version answering requests that name none")
    pinned: bool = Field(description="a plan pins the serving version (else: the newest)")
    candidate: str | None
    mode: Literal["shadow", "canary"] | None
    share: float
    versions: list[str] = Field(description="every loaded version")
    file: str = Field(description="ROLLOUT_FILE, where every worker reads the plans")
    written: bool | None = Field(
        description="whether the last change made here reached the file (false: a read-only "
        "folder, so it holds in the worker that answered only); null before any"
    )
    history: list[dict] = Field(description="the latest changes, oldest first")


class ErrorBody(BaseModel):
    detail: str = Field(examples=["the image is 64x48; the model takes 32x32. ..."])


# --- the Open Inference Protocol (v2) -------------------------------------------------


class V2ServerMetadata(BaseModel):
    name: str = Field(examples=["cifar100-classifier"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(examples=[["binary_tensor_data", "classification"]])


class V2ModelMetadata(BaseModel):
    name: str = Field(examples=["cifar100-5735844"])
    versions: list[str] = Field(description="content hashes of the files served")
    platform: str = Field(examples=["onnxruntime_onnx"])
    inputs: list[dict[str, Any]] = Field(
        examples=[[{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]]
    )
    outputs: list[dict[str, Any]] = Field(
        examples=[[{"name": "probabilities", "datatype": "FP32", "shape": [-1, 100]}]]
    )


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2Error(BaseModel):
    error: str = Field(examples=["input 'images' must have datatype UINT8, got 'FP32'"])
