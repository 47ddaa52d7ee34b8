"""The GPU and cloud-offer catalogue: a dated TOML file that users override (see catalogue.toml for its fields)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from statistics import median

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT = Path(__file__).with_name("catalogue.toml")


class CatalogueError(ValueError):
    """The catalogue file is missing, not TOML, or inconsistent; the message says where."""


class GPU(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    label: str
    vram_gib: float = Field(gt=0)
    bf16: bool
    tflops_bf16: float = Field(ge=0)
    tflops_fp16: float = Field(gt=0)
    tflops_fp32: float = Field(gt=0)
    # The accelerator's name as SkyPilot spells it (`sky show-gpus`), for `prsmed launch`; "" where it has none.
    sky: str = ""

    def tflops(self, precision: str) -> float:
        if precision == "fp32":
            return self.tflops_fp32
        if precision in ("bf16", "4bit") and self.bf16:
            return self.tflops_bf16
        return self.tflops_fp16


class Platform(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    spot_discount: float | None = Field(None, ge=0, lt=1)
    subscription_usd_month: float | None = Field(None, gt=0)
    session_hours: float | None = Field(None, gt=0)
    note: str = ""


class Offer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    platform: str
    gpu: str
    usd_h: float | None = Field(None, gt=0)
    usd_h_spot: float | None = Field(None, gt=0)
    source: str = "list"
    note: str = ""


class Catalogue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    date: str
    gpu: list[GPU]
    platform: list[Platform]
    offer: list[Offer]
    path: str = ""

    @model_validator(mode="after")
    def _check(self) -> Catalogue:
        gpus = {g.name for g in self.gpu}
        platforms = {p.name: p for p in self.platform}
        for i, o in enumerate(self.offer):
            if o.gpu not in gpus:
                raise ValueError(f"offer {i + 1} ({o.platform}) names GPU {o.gpu!r}, which no [[gpu]] defines")
            if o.platform not in platforms:
                raise ValueError(f"offer {i + 1} names platform {o.platform!r}, which no [[platform]] defines")
            if o.usd_h is None and platforms[o.platform].subscription_usd_month is None:
                raise ValueError(f"offer {i + 1} ({o.platform}, {o.gpu}) has no usd_h and its platform no "
                                 f"subscription_usd_month")
        return self

    def gpu_named(self, name: str) -> GPU:
        for g in self.gpu:
            if g.name == name.lower():
                return g
        raise CatalogueError(f"unknown GPU {name!r}; the catalogue ({self.path or 'built in'}) has: "
                             f"{', '.join(g.name for g in self.gpu)}")

    def platform_named(self, name: str) -> Platform:
        return next(p for p in self.platform if p.name == name)

    def spot_price(self, offer: Offer) -> float | None:
        if offer.usd_h_spot is not None:
            return offer.usd_h_spot
        discount = self.platform_named(offer.platform).spot_discount
        if offer.usd_h is not None and discount is not None:
            return round(offer.usd_h * (1 - discount), 3)
        return None

    def hourly_price(self, gpu: str) -> float:
        """A typical on-demand USD per hour for one ``gpu``: the median of the catalogue's offers."""
        name = self.gpu_named(gpu).name
        prices = [o.usd_h for o in self.offer if o.gpu == name and o.usd_h is not None]
        if not prices:
            raise CatalogueError(f"the catalogue ({self.path}) has no hourly price for GPU {gpu!r}")
        return float(median(prices))


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    """The catalogue at ``path``, else $PRSMED_CATALOGUE, else the one shipped with the package."""
    chosen = Path(path or os.environ.get("PRSMED_CATALOGUE") or DEFAULT).expanduser()
    try:
        data = tomllib.loads(chosen.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogueError(f"catalogue file {chosen} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CatalogueError(f"catalogue file {chosen} is not valid TOML: {e}") from None
    try:
        return Catalogue.model_validate({**data, "path": str(chosen)})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise CatalogueError(f"catalogue file {chosen}: {where}: {first['msg']}") from None
