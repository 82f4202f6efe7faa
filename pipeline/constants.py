"""Constants shared by the shard writer, the loaders, the trainer and the tools.

Defined once here; everything else imports them.
"""

NUM_CLASSES = 5
CLASS_NAMES = ("0 none", "1 mild", "2 moderate", "3 severe", "4 proliferative")

# ImageNet statistics on the 0-255 scale (torchvision's weights expect these).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# EyePACS training-set class counts (grades 0-4) and the fractions they make.
EYEPACS_CLASS_COUNTS = (25810, 2443, 5292, 873, 708)
EYEPACS_CLASS_MIX = tuple(c / sum(EYEPACS_CLASS_COUNTS) for c in EYEPACS_CLASS_COUNTS)

# Files packed as images (any Pillow reads), matched case-insensitively; a GIF by its first frame.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".gif")

SPLITS = ("train", "val", "test")  # val chooses (best epoch, thresholds); test only reports
SHARD_NAME = "{split}-{index:06d}.tar"  # e.g. train-000000.tar
INDEX_SUFFIX = ".idx"  # DALI wds2idx index beside each tar
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.csv"
MANIFEST_VERSION = 1

# Sample extensions inside a shard (WebDataset convention: <key>.jpg + <key>.cls).
IMAGE_EXT = "jpg"
LABEL_EXT = "cls"

DEFAULT_IMAGE_SIZE = 512
DEFAULT_SHARD_SIZE = 1000  # samples per shard
