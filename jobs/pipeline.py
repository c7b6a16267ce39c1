"""Precompute (or reuse) the reference store, train, then evaluate the trained model: one job.

ray job submit --working-dir . -- python jobs/pipeline.py --config configs/llama3-8b.yaml
"""

import sys

from kto_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
