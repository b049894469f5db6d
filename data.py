"""data.py: one `Sample` record for every dataset this project reads (SPEC §11).

Loaders for the formats users bring (ReasonSeg folders, HF-style rows, stage-1 rows) live here;
the synthetic sandbox world lives in world.py and produces the same records.
Tested by: python -m pytest tests/test_data.py
"""
from dataclasses import dataclass, field
import numpy as np


@dataclass
class Sample:
    id: str                       # unique within its split, e.g. "reasonseg/val/123" or "world/test/7/2"
    image: np.ndarray             # (H, W, 3) uint8, the ORIGINAL image (SAM and metrics work here)
    query: str                    # the (implicit) query, raw; model.normalize_query cleans it
    masks: np.ndarray             # (K, H, W) bool, one per target instance; K = 0 means "no target"
    boxes: np.ndarray = None      # (K, 4) float x1,y1,x2,y2 in original pixels, or None (masks only)
    points: np.ndarray = None     # (K, 2) float x,y in original pixels, or None
    labels: list = field(default_factory=list)  # K short names ("red circle"); may be empty
    reasoning_type: str = None    # ReasonSeg-X type / world family, e.g. "P/F"; None if unknown
    ignore: np.ndarray = None     # (H, W) bool pixels excluded from metrics, or None

    @property
    def gt_mask(self):
        """(H, W) bool union of all target instances."""
        h, w = self.image.shape[:2]
        return self.masks.any(0) if len(self.masks) else np.zeros((h, w), bool)
