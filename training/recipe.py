"""A run's recipe: every setting training depends on, validated when it is made, saved as
recipe.json and in the model card, with how it differs from the default and why the
default is what it is. Knows nothing of data or of the training loop (training/train.py)."""

from dataclasses import asdict, dataclass

import keras

# Where the defaults below come from, for every recipe.json and model card.
EVIDENCE = (
    "defaults chosen by `python -m training ablate` on real photos (10 classes at "
    "CIFAR-100's counts per class; not CIFAR-100): README, 'Which recipe, and why'"
)
AUGMENTATIONS = ("crop+flip", "crop", "flip", "none")
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class Recipe:
    """Every setting a run depends on; saved as recipe.json and in the model card, and
    compared field by field to decide whether a run or an export is already done."""

    epochs: int = 48
    batch_size: int = 128
    optimizer: str = "adamw"  # one of OPTIMIZERS; "adam" ignores weight_decay
    learning_rate: float = 1e-3
    schedule: str = "cosine"  # one of SCHEDULES: cosine decay to 0, or constant
    weight_decay: float = 5e-4
    augment: str = "crop+flip"  # one of AUGMENTATIONS
    # After each conv block and each hidden dense layer. The seed tables give no rates;
    # 0.25 / 0.5 underfit on real photos in the ablation, so the layers stay at rate 0.
    conv_dropout: float = 0.0
    dense_dropout: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    mixed_precision: bool = False
    # How fast it runs. Op determinism is what makes a resumed run end with the weights of
    # an uninterrupted one, and a seed repeatable; it also keeps Keras from compiling with
    # XLA. Off (--no-deterministic), TensorFlow may pick faster nondeterministic GPU kernels
    # and Keras compiles the train step with XLA where it can (on a GPU, one device).
    deterministic: bool = True
    # Training steps per tf.function call: 1 returns to Python after every batch, which
    # leaves a fast GPU idle between the small batches of these small models.
    steps_per_execution: int = 1
    # Classes left out of training and validation (by name, sorted); their test images stay
    # in the test split, scored apart: how the model meets classes it does not know.
    held_out_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A recipe.json of another version, or a typo on the command line, fails here and
        # not hours later.
        held_out = self.held_out_classes
        if not isinstance(held_out, tuple | list) or not all(
            isinstance(n, str) and n for n in held_out
        ):
            raise ValueError(f"held-out classes must be class names, not {held_out!r}")
        if len(set(held_out)) != len(held_out):
            raise ValueError(f"held-out classes name a class twice: {', '.join(held_out)}")
        # One spelling per set of classes (recipe.json holds a list): runs that hold out the
        # same classes have equal recipes, whatever the order they were given in.
        object.__setattr__(self, "held_out_classes", tuple(sorted(held_out)))
        for name, value, allowed in (
            ("augment", self.augment, AUGMENTATIONS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        for name in ("conv_dropout", "dense_dropout", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs, batch size and learning rate must be positive")
        if self.steps_per_execution < 1:
            raise ValueError(
                f"steps per execution must be at least 1, not {self.steps_per_execution}"
            )

    def method(self) -> dict:
        """What the numbers above drive, in words, for the model card."""
        optimizer = (
            f"AdamW, weight decay {self.weight_decay}" if self.optimizer == "adamw" else "Adam"
        )
        schedule = (
            f"cosine decay from {self.learning_rate} to 0 over {self.epochs} epochs"
            if self.schedule == "cosine"
            else f"constant {self.learning_rate}"
        )
        augmentation = {
            "crop+flip": "4px reflect pad + random 32x32 crop, horizontal flip",
            "crop": "4px reflect pad + random 32x32 crop",
            "flip": "horizontal flip",
            "none": "none",
        }[self.augment]
        return {
            "optimizer": optimizer,
            "schedule": schedule,
            "augmentation": augmentation,
            "dropout": f"{self.conv_dropout} after conv blocks, {self.dense_dropout} after dense",
            "label_smoothing": self.label_smoothing,
            "precision": "mixed float16, float32 softmax" if self.mixed_precision else "float32",
            "execution": (
                "op determinism (exact resumes), no XLA"
                if self.deterministic
                else "nondeterministic kernels allowed, XLA where Keras can"
            )
            + f", {self.steps_per_execution} step(s) per execution",
            "checkpoint_selection": "best validation accuracy",
            "classes": (
                f"all but {', '.join(self.held_out_classes)} (held out of training and "
                "validation; test accuracy is over the other classes' images)"
                if self.held_out_classes
                else "all"
            ),
        }

    def record(self) -> dict:
        """The recipe as recipe.json and the model card hold it (lists where the recipe has
        tuples): what a saved recipe is compared with."""
        return {**asdict(self), "held_out_classes": list(self.held_out_classes)}

    def choice(self) -> dict:
        """How this recipe relates to the default one, and why the default is what it is."""
        default = Recipe(epochs=self.epochs, seed=self.seed).record()
        differs = {k: v for k, v in self.record().items() if default[k] != v}
        return {"differs_from_default": differs, "evidence": EVIDENCE}

    def optimizer_instance(self, steps_per_epoch: int) -> keras.optimizers.Optimizer:
        rate = self.learning_rate
        if self.schedule == "cosine":
            rate = keras.optimizers.schedules.CosineDecay(
                rate, decay_steps=self.epochs * steps_per_epoch
            )
        if self.optimizer == "adam":
            return keras.optimizers.Adam(learning_rate=rate)
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=self.weight_decay)
