"""Build the reference store (reference log-probs, once per dataset) on the cluster this job runs on.

ray job submit --working-dir . -- python jobs/precompute_ref.py --config configs/llama3-8b.yaml
"""

import sys

from kto_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["precompute", *sys.argv[1:]]))
