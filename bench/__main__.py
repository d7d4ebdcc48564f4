"""python -m bench --model MODEL_DIR: attnserve against its peers, in one run (see bench/harness.py)."""
import sys

from bench.harness import main

sys.exit(main())
