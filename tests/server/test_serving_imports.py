"""The serving image holds server/ and the generated protocol code only: server/ must import without
torch, onnx, the exporter or the model definition."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter in which these top-level packages cannot be imported, as in the serving image.
PROGRAM = """
import importlib.abc, sys
ABSENT = {"torch", "onnx", "onnxscript", "transformers", "safetensors", "gguf", "export", "model", "bench"}

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (absent from the serving image)")

sys.meta_path.insert(0, Absent())
import server.__main__, server.app, server.client, server.contract
print("imported", sorted(m for m in sys.modules if m.split(".")[0] in ABSENT))
"""


def test_server_imports_without_torch_onnx_export_or_model():
    result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported []"


def test_the_contract_imports_nothing_of_attnserve():
    source = (ROOT / "server" / "contract.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports and not [line for line in imports if line.split()[1].split(".")[0] in
                            {"server", "export", "model", "bench", "attnserve"}], imports
