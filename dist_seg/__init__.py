"""dist_seg: distributed binary semantic segmentation on WebDataset shards."""

__version__ = "0.1.0"
