"""Write README.md from nbs/index.ipynb without Quarto (nbdev_readme needs it): markdown cells verbatim, code
cells as fenced python with their printed (stdout) and returned outputs; cells marked `#|hide` are left out. `--check` exits 1 if
README.md is out of date instead of writing it."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Written by `python tools/readme.py` from nbs/index.ipynb: edit the notebook, not this file. -->\n\n"


def render(nb_path: Path) -> str:
    parts = []
    for cell in json.loads(nb_path.read_text())["cells"]:
        src = "".join(cell["source"]).strip("\n")
        if cell["cell_type"] == "markdown":
            parts.append(src)
            continue
        lines = [line for line in src.splitlines() if not line.startswith("#|")]
        if any(line.strip() in ("#| hide", "#|hide") for line in src.splitlines()) or not "".join(lines).strip():
            continue
        parts.append("```python\n" + "\n".join(lines).strip("\n") + "\n```")
        text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", [])
                       if o.get("output_type") == "stream" and o.get("name") == "stdout")  # not progress bars
        text += "".join("".join(o["data"].get("text/plain", "")) for o in cell.get("outputs", [])
                        if o.get("output_type") == "execute_result")
        if text.strip():
            parts.append("```\n" + text.strip("\n") + "\n```")
    return HEADER + "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    readme, text = ROOT / "README.md", render(ROOT / "nbs" / "index.ipynb")
    if "--check" in sys.argv[1:]:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is out of date with nbs/index.ipynb: run `python tools/readme.py`")
    else:
        readme.write_text(text)
