"""What ran, in words, from the resolved protocol recorded with the runs.

Nothing here names a model, data set or budget the runs did not record: runs from outside the
harness (no protocol) are described as "not recorded".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from study.engine.model import CLASSES, IMAGE_SIDE

NOT_RECORDED = "not recorded (no resolved protocol was logged with these runs)"
# d2l's LeNet-5 as study.model.lenet builds it.
LENET_LAYERS = ("conv 6@5\u00d75, avg-pool, conv 16@5\u00d75, avg-pool, dense 120, dense 84, "
                f"dense {CLASSES}")


@dataclass(frozen=True)
class Setup:
    """The run set-up in words; every field says "not recorded" when the protocol is absent."""

    model_short: str  # "an MLP 784-256-256-10" / "d2l's LeNet-5"
    model: str  # architecture, where dropout sits, initialisation
    training: str
    data: str
    convolutions: bool | None  # None: not recorded

    @property
    def recorded(self) -> bool:
        return self.convolutions is not None


def setup(protocol: dict[str, Any] | None) -> Setup:
    if not protocol:
        return Setup("a model that was not recorded", NOT_RECORDED, NOT_RECORDED, NOT_RECORDED,
                     None)
    model = protocol.get("model") or {}
    arch = model.get("arch", "mlp")
    return Setup(model_short(model), model_text(model),
                 training_text(protocol.get("training") or {}),
                 data_text(protocol.get("data") or {}), arch == "lenet")


def model_short(model: dict[str, Any]) -> str:
    if model.get("arch", "mlp") == "lenet":
        return "d2l's LeNet-5"
    return f"an MLP {_mlp_shape(model)}"


def _mlp_shape(model: dict[str, Any]) -> str:
    sizes = [IMAGE_SIDE * IMAGE_SIDE, *(model.get("hidden") or []), CLASSES]
    return "-".join(str(s) for s in sizes)


def init_text(model: dict[str, Any]) -> str:
    if model.get("init", "normal") == "xavier":
        weights = "Xavier-uniform weights"
    else:
        weights = f"weights N(0, {model.get('init_std')}\u00b2)"
    return f"{weights}, biases U(\u00b11/\u221afan_in) (PyTorch's default law)"


def model_text(model: dict[str, Any]) -> str:
    if model.get("arch", "mlp") == "lenet":
        return (f"d2l's LeNet-5 with sigmoid activations ({LENET_LAYERS}), dropout after the "
                f"two hidden dense layers; {init_text(model)}")
    return (f"an MLP {_mlp_shape(model)} with ReLU, dropout after each hidden layer; "
            f"{init_text(model)}")


def training_text(training: dict[str, Any]) -> str:
    # Per-size budgets name each size's lr in budget_text; one lr up front would contradict them.
    lr = "" if training.get("by_size") else f"lr {training.get('lr')}, "
    return (f"{str(training.get('optimizer', 'sgd')).upper()}, {lr}batch "
            f"{training.get('batch_size')}, {budget_text(training)}, cross-entropy")


def budget_text(training: dict[str, Any]) -> str:
    """'10 epochs', with the test evaluation's frequency when it is not every epoch, and one
    budget per training-set size, each with its lr, where the protocol gives them
    (`training.by_size`)."""
    def one(epochs: Any, every: Any, lr: Any = None) -> str:
        return (f"{epochs} epochs" + ("" if lr is None else f" at lr {lr}")
                + ("" if every in (None, 1) else f" (test every {every})"))
    sizes = training.get("by_size") or []
    if not sizes:
        return one(training.get("epochs"), training.get("eval_every"))
    lr = training.get("lr")
    default = one(training.get("epochs"), training.get("eval_every"), lr)
    each = [f"{one(b.get('epochs'), b.get('eval_every'), b.get('lr') or lr)} at "
            f"{_images(b.get('train_subset'))}" for b in sizes]
    return "; ".join(each) + f"; otherwise {default}"


def _images(subset: Any) -> str:
    return "all images" if subset is None else f"{subset:,} images"


def data_text(data: dict[str, Any]) -> str:
    subset = data.get("train_subset")
    if isinstance(subset, list):
        sizes = ", ".join("all 60,000" if n is None else f"{n:,}" for n in subset)
        images = (f"training-set sizes {sizes} (the first N images in file order, so the "
                  "smaller sets are nested in the larger)")
    else:
        images = ("all 60,000" if subset is None else f"the first {subset:,}") + \
            " training images"
    name = {"fashion-mnist": "Fashion-MNIST"}.get(data.get("dataset"), str(data.get("dataset")))
    return f"{name}, {images}, 10,000 test images"
