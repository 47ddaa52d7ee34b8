"""What a component is: its kind, its contract, and how it is built.

A plugin describes each component it offers with a :class:`ComponentSpec`. The spec can say what the component
will look like (its :class:`Contract`) from the options alone, without building a module or reading weights, so
the composite model can reject an incompatible combination before anything heavy happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:  # torch is imported where modules are built, so `import prsmed` (and the CLI) stay light
    import torch

KINDS = ("vision_encoder", "llm", "fusion_head")
Kind = Literal["vision_encoder", "llm", "fusion_head"]


class Contract(BaseModel):
    """The shapes and dtype a component promises; checked before weights load."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    dtype: str = "float32"


class VisionEncoderContract(Contract):
    """pixels (B, in_channels, input_size, input_size) -> features (B, out_channels, grid, grid)."""

    input_size: int
    in_channels: int = 3
    out_channels: int
    stride: int = 16
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def grid(self) -> int:
        return self.input_size // self.stride


class LLMContract(Contract):
    """tokens (+ image) -> last-layer hidden states (B, T, hidden_size)."""

    hidden_size: int
    vocab_size: int
    # LLM-side image path: the side of the square image its tower takes and how many tokens an image becomes.
    # Both are 0 for a text-only backbone.
    image_size: int = 0
    image_tokens: int = 0


class FusionHeadContract(Contract):
    """(image features (B, image_dim, h, w), prompt states (B, T, prompt_dim)) -> logits (B, 1, upsample*h, upsample*w)."""

    image_dim: int
    prompt_dim: int
    upsample: int = 16


class ComponentError(ValueError):
    """A component cannot be found, built or combined; the message says what was expected and what was found."""


@dataclass(frozen=True)
class ComponentSpec:
    """One buildable component offered by a plugin.

    ``build(**options)`` returns a ready ``torch.nn.Module`` whose ``contract`` attribute equals
    ``contract(**options)``. Every built-in accepts ``checkpoint=PATH``; ``contract`` must not read weights.
    """

    kind: Kind
    name: str
    build: Callable[..., torch.nn.Module]
    contract: Callable[..., Contract]
    description: str = ""
    plugin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ComponentError(f"component {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


def check_compatible(
    vision: VisionEncoderContract, llm: LLMContract, head: FusionHeadContract, *, names: dict[str, str] | None = None
) -> None:
    """Raise :class:`ComponentError` naming the first dimension on which the three components disagree."""
    n = names or {"vision_encoder": "vision encoder", "llm": "LLM", "fusion_head": "fusion head"}
    problems = []
    if vision.out_channels != head.image_dim:
        problems.append(
            f"{n['vision_encoder']} outputs {vision.out_channels} channels but {n['fusion_head']} expects "
            f"image_dim={head.image_dim}"
        )
    if llm.hidden_size != head.prompt_dim:
        problems.append(
            f"{n['llm']} hidden size is {llm.hidden_size} but {n['fusion_head']} expects prompt_dim={head.prompt_dim}"
        )
    if vision.stride != head.upsample:
        problems.append(
            f"{n['vision_encoder']} reduces the image {vision.stride}x but {n['fusion_head']} upsamples "
            f"{head.upsample}x, so the mask would not match the input size"
        )
    if problems:
        raise ComponentError("incompatible components: " + "; ".join(problems))


def parse_options(component_id: str, options_cls: type[BaseModel], options: dict[str, Any]) -> Any:
    """Validate a component's ``options`` with its pydantic model (``extra="forbid"``).

    Any problem becomes a :class:`ComponentError` naming the offending option and listing every accepted one, so
    a misspelt option is reported instead of silently ignored.
    """
    try:
        return options_cls(**options)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown option {where!r}")
            elif where:
                problems.append(f"{where}: {message} (got {err.get('input')!r})")
            else:  # a check across several options
                problems.append(message)
        accepted = ", ".join(options_cls.model_fields)
        raise ComponentError(f"{component_id}: {'; '.join(problems)}. Accepted options: {accepted}") from None


def module_spec(kind: str, name: str, module_cls: Callable[[Any], Any], options_cls: type[BaseModel],
                description: str) -> ComponentSpec:
    """The spec of a component built straight from its validated options: ``options_cls`` answers the contract
    (its ``contract()``), ``module_cls(options)`` is the module, and a ``checkpoint`` option is loaded strictly."""
    component_id = f"{kind}/{name}"

    def contract(**options: Any):
        return parse_options(component_id, options_cls, options).contract()

    def build(**options: Any):
        from prsmed.weights import load_strict, read_state_dict

        parsed = parse_options(component_id, options_cls, options)
        module = module_cls(parsed)
        if getattr(parsed, "checkpoint", None) is not None:
            load_strict(module, read_state_dict(parsed.checkpoint), source=str(parsed.checkpoint))
        return module

    return ComponentSpec(kind=kind, name=name, build=build, contract=contract, description=description)
