"""Check mtil-mini v2's design criteria on finished runs; exit status 1 when one fails.

    python scripts/check_mtil_mini.py runs/mtil-mini-s*/per_task_lora runs/mtil-mini-s*/seq_lora

Each argument is a run directory (its results.json) of per_task_lora or seq_lora, any number of
seeds; the criteria are on the means over seeds (``continual_lora.benchmarks.mtil_mini.design_criteria``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from continual_lora.benchmarks.mtil_mini import design_criteria


def main(paths: list[str]) -> int:
    runs: dict[str, list[dict]] = {"per_task_lora": [], "seq_lora": []}
    for p in paths:
        result = json.loads((Path(p) / "results.json").read_text())
        if result["method"] not in runs:
            raise SystemExit(f"{p}: a {result['method']} run; give per_task_lora and seq_lora runs")
        if not result.get("finished"):
            raise SystemExit(f"{p}: an unfinished run; finish it with `continual-lora run <config> --resume`")
        bench = result["config"]["benchmark"]
        if bench.get("name") != "mtil-mini" or bench.get("version") != 2 or bench.get("validation"):
            raise SystemExit(f"{p}: not a run of mtil-mini v2's test stream (benchmark: {bench})")
        runs[result["method"]].append(result)
    bases = {r["base_model"] for rs in runs.values() for r in rs}
    if len(bases) > 1:
        raise SystemExit(f"check_mtil_mini: the runs start from different base models {sorted(bases)}")
    print(f"seeds: per_task_lora {len(runs['per_task_lora'])}, seq_lora {len(runs['seq_lora'])}")
    try:
        criteria = design_criteria(runs["per_task_lora"], runs["seq_lora"])
    except ValueError as err:
        raise SystemExit(f"check_mtil_mini: {err}") from None
    for c in criteria:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.value:.1f} (limit {c.bound:g})")
    return 0 if all(c.ok for c in criteria) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
