"""Adapter files: safetensors + JSON round trips, shape errors that name the layer, and no pickle
anywhere in the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from conftest import adapt, clip_out, make_tiny_clip

import continual_lora
from continual_lora.adapters import load_adapter, save_adapter, set_task, use_task

PACKAGE = Path(continual_lora.__file__).resolve().parent


# --- save / load ---------------------------------------------------------------------------
def test_save_load_roundtrip_several_tasks(tmp_path):
    model = adapt(make_tiny_clip(), tasks=("t1", "t2", "t3"), seed=5)
    set_task(model, "t2")
    save_adapter(model, tmp_path / "ckpt")
    fresh = make_tiny_clip()
    load_adapter(fresh, tmp_path / "ckpt")
    assert torch.equal(clip_out(fresh), clip_out(model))  # the active task comes back too
    outs = []
    for task in ("t1", "t2", "t3"):
        with use_task(model, task), use_task(fresh, task):
            outs.append(clip_out(model))
            assert torch.equal(clip_out(fresh), outs[-1]), task
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


def test_load_into_other_shapes_names_layer_and_shapes(tmp_path):
    save_adapter(adapt(make_tiny_clip(), rank=4), tmp_path)
    with pytest.raises(ValueError) as info:
        load_adapter(make_tiny_clip(hidden=48), tmp_path)
    msg = str(info.value)
    layer = re.search(r"'((?:text|vision)_model\.[\w.]+_proj|[\w.]+fc\d)'", msg)
    assert layer, msg
    saved = make_tiny_clip().get_submodule(layer.group(1))
    other = make_tiny_clip(hidden=48).get_submodule(layer.group(1))
    shapes = {(4, saved.in_features), (saved.out_features, 4)}
    other_shapes = {(4, other.in_features), (other.out_features, 4)}
    assert any(str(s) in msg for s in shapes) and any(str(s) in msg for s in other_shapes), msg


# --- no pickle anywhere in the package -----------------------------------------------------
PICKLE_WHITELIST = {"data/domains.py"}  # reads mnist.pkl.gz shipped inside a package


def unsafe_loads(source: str) -> list[str]:
    """Calls that unpickle: torch.load without weights_only=True, pickle.load(s), Unpickler."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func == "torch.load" or func.endswith(".torch.load"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if re.search(r"(^|\.)(pickle|cPickle|dill|joblib)\.(load|loads|Unpickler)$", func):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_unsafe_load_checker_catches_offenders():
    assert unsafe_loads("import torch\nx = torch.load('a.pt')\n")
    assert unsafe_loads("import torch\nx = torch.load('a.pt', weights_only=False)\n")
    assert unsafe_loads("import pickle\nx = pickle.load(open('a', 'rb'))\n")
    assert unsafe_loads("import pickle\nx = pickle.loads(b'')\n")
    assert not unsafe_loads("import torch\nx = torch.load('a.pt', weights_only=True)\n")


def test_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5
    offenders = []
    for path in files:
        rel = path.relative_to(PACKAGE).as_posix()
        for hit in unsafe_loads(path.read_text()):
            if rel in PICKLE_WHITELIST and "torch.load" not in hit:
                continue
            offenders.append(f"{rel} {hit}")
    assert not offenders, "unpickling outside the whitelist:\n" + "\n".join(offenders)
