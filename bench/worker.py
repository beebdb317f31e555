"""``python -m bench.worker TASK JSON``: one measurement in a fresh process; prints its JSON result last."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import logging
    import warnings

    from bench.matrix_fit import fit_worker
    from bench.train import memory_worker

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    tasks = {"train_memory": memory_worker, "matrix_fit": fit_worker}
    task, args = argv[0], json.loads(argv[1])
    result = tasks[task](args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
