"""`raylm train` as a Ray job.

Launch on a running cluster (from the repository root):
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny.yaml [key=value ...]
"""

import sys
from pathlib import Path

# With `--working-dir .` the repository is shipped without being installed: make the library importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
