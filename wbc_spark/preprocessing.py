"""The preprocessing contract: how a crop was made (side, context, stain standardisation,
framing).

Ingest stores it with every dataset row, training reads it from the dataset and writes it into
the model artifact, and scoring and cross-validation compare against it; ``check`` is the one
rule they all apply. Crops made one way and a model trained on crops made another way do not
mix: the job refuses (training, cross-validation) or re-crops from the original images
(scoring a dataset).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from wbc_spark import images
from wbc_spark.config import Config
from wbc_spark.transforms import CellBox, cell_crop


class ContractError(ValueError):
    """Crops were made differently from what is asked of them."""


@dataclass(frozen=True)
class Preprocessing:
    crop_size: int
    context: float  # crop side / located cell's larger side
    stain: str  # wbc_spark.stain mode
    framing: str  # wbc_spark.transforms.frame_box mode

    @classmethod
    def from_config(cls, config: Config) -> Preprocessing:
        d = config.data
        return cls(int(d.crop_size), float(d.context), d.stain, d.framing)

    @classmethod
    def from_artifact(cls, meta: dict) -> Preprocessing:
        pre = meta["preprocessing"]
        # Models from before stain (framing) was stored were all made without standardisation
        # (with reflected borders).
        return cls(int(pre["crop_size"]), float(pre["context"]), pre.get("stain", "none"),
                   pre.get("framing", "reflect"))

    def to_dict(self) -> dict:
        return asdict(self)

    def crop(self, data: bytes) -> tuple[np.ndarray, CellBox, np.ndarray | None]:
        """``transforms.cell_crop`` (crop, box, mask) of an encoded image, made as this contract
        says: the scoring job's crops, and those of the report and the benchmarks that must
        match them."""
        return self.crop_image(images.decode(data))

    def crop_image(self, image: Image.Image) -> tuple[np.ndarray, CellBox, np.ndarray | None]:
        """The same of a decoded image."""
        return cell_crop(image, self.crop_size, context=self.context, stain=self.stain,
                         framing=self.framing)

    def same_as(self, other: Preprocessing) -> bool:
        return (self.crop_size == other.crop_size and abs(self.context - other.context) < 1e-9
                and self.stain == other.stain and self.framing == other.framing)


def of_dataset(rows: Iterable[tuple], where: str) -> Preprocessing:
    """The one contract of a dataset's rows, from its distinct (crop_size, context, stain,
    framing); refuse a dataset that mixes several, or was made before the context or the
    framing was stored."""
    made = sorted({(int(s), c if c is None else float(c), st or "none", f)
                   for s, c, st, f in rows}, key=str)
    if not made:
        raise ContractError(f"{where}: no rows")
    for i, name in ((1, "context"), (3, "framing")):
        if any(m[i] is None for m in made):
            raise ContractError(f"{where}: made before the crop {name} was stored with each "
                                "row; ingest the lake again into a new data.dataset")
    if len(made) > 1:
        raise ContractError(f"{where}: crops made in {len(made)} ways (crop_size, context, "
                            f"stain, framing) {made}; ingest again into a new data.dataset")
    return Preprocessing(*made[0])


def check(made: Preprocessing, wanted: Preprocessing, where: str, remedy: str) -> None:
    """Refuse when crops ``made`` one way are asked for as ``wanted``."""
    if not made.same_as(wanted):
        raise ContractError(f"{where}: crops were made as {made.to_dict()}, {wanted.to_dict()} "
                            f"is wanted; {remedy}")
