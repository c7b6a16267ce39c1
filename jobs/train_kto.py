"""Train the policy with KTO on the Ray cluster this job was submitted to (a local Ray when run directly).

ray job submit --working-dir . -- python jobs/train_kto.py --config configs/llama3-8b.yaml
"""

import sys

from kto_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
