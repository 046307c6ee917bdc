"""`continual-lora compare` rows: seeds of one variant are averaged, variants of one method are not
(runs started with `group=<variant>`), and `--by label|name` regroup the same directories."""

from __future__ import annotations

import json
import re

from continual_lora.app.compare import row_key
from continual_lora.cli import main


def rows(capsys, *argv) -> dict[str, str]:
    """row name -> its `seeds` cell, from the markdown table `compare` prints."""
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| ") and "seeds" in line)
    seeds_col = [c.strip() for c in header.strip("|").split("|")].index("seeds")
    table = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and line != header and not re.fullmatch(r"[-:| ]+", line):
            table[cells[0]] = cells[seeds_col]
    return table


def test_compare_groups_seeds_of_a_variant_and_keeps_variants_apart(synthetic, tmp_path, capsys) -> None:
    runs = [("a0", "a", 0), ("a1", "a", 1), ("b0", "b", 0), ("plain0", None, 0), ("plain1", None, 1)]
    for name, group, seed in runs:
        extra = [f"group={group}"] if group else []
        assert main(["run", str(synthetic), f"output_dir={tmp_path}", f"name={name}", f"seed={seed}",
                     "train.progress=false", *extra]) == 0
    capsys.readouterr()
    dirs = [tmp_path / name / "seq_lora" for name, _, _ in runs]
    assert json.loads((dirs[0] / "results.json").read_text())["group"] == "a"
    assert "group" not in json.loads((dirs[3] / "results.json").read_text())
    assert rows(capsys, "compare", *dirs) == {"a/seq_lora": "2", "b/seq_lora": "1", "seq_lora": "2"}
    assert rows(capsys, "compare", "--by", "label", *dirs) == {"seq_lora": "5"}
    assert rows(capsys, "compare", "--by", "name", *dirs) == {f"{n}/seq_lora": "1" for n, _, _ in runs}


def test_row_key_of_results_written_before_groups_existed() -> None:
    old = {"method": "lilora", "label": "lilora-frozen", "config": {"name": "sweep"}}
    assert row_key(old) == row_key(old, "label") == "lilora-frozen"
    assert row_key(old, "name") == "sweep/lilora-frozen"
    assert row_key({"method": "lilora"}) == "lilora"
