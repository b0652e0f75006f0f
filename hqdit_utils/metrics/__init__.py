"""Image-quality metrics: FID, sFID, IS, precision/recall — ADM-compatible at full scale, proxy (starred) on the embedded model."""
