"""The library core needs torch and transformers alone: ``kvcake.compress`` and the methods never import the
command line's extras (typer, rich, tqdm, matplotlib, rouge, gguf, accelerate)."""

import ast
import subprocess
import sys
from pathlib import Path

EXTRAS = {"typer", "rich", "tqdm", "matplotlib", "rouge", "gguf", "accelerate"}
CORE = ["__init__.py", "_lazy.py", "methods", "engines/transformers"]
SRC = Path(__file__).resolve().parents[1] / "src" / "kvcake"

SCRIPT = r"""
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
before = set(sys.modules)
import kvcake

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1)).eval()
ids = torch.randint(0, 64, (1, 50))
for name in kvcake.methods.method_names():
    if name == "full":
        continue
    method = kvcake.methods.build(name, budget=20, window=8)
    with kvcake.compress(model, method) as press:
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert press.report.kept_after_prefill, name
print(" ".join(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
"""


def test_core_modules_import_no_extra():
    files = [p for entry in CORE for p in ((SRC / entry).rglob("*.py") if (SRC / entry).is_dir() else [SRC / entry])]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & EXTRAS, f"{path.relative_to(SRC)} imports an extra"


def test_the_library_runs_without_loading_the_cli_extras():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(done.stdout.split())
    assert not loaded & {"typer", "rich", "matplotlib", "rouge", "gguf"}, loaded
