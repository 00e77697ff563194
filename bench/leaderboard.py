"""The shapes leaderboard: every shipped shapes config trained under several seeds to equal
reward-query budgets, each scored against its base on held-out prompts, pooled with its standard
error; resumable. The whole story is in ``genalign/leaderboard.py``.

    .venv/bin/python bench/leaderboard.py --trl --docs docs --readme README.md   # all configs and TRL: many CPU hours
    .venv/bin/python bench/leaderboard.py --configs configs/shapes/diffusion_nft.yaml --seeds 0 --budgets 160 320 \
        --per-task 10 --records runs/try --out runs/try                           # a quick try, beside the records
"""

import sys

from genalign.leaderboard import main

if __name__ == "__main__":
    sys.exit(main())
