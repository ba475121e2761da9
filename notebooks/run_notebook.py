"""Run a notebook's code cells in order, without Jupyter, and optionally save their outputs.

    python notebooks/run_notebook.py notebooks/text_to_text_dpo.ipynb          # check it runs
    python notebooks/run_notebook.py notebooks/text_to_text_dpo.ipynb --save   # and store outputs

The cells share one namespace and run with the notebook's folder as working directory, as
in Jupyter. Printed text becomes a stream output, each open matplotlib figure a PNG output.
tests/test_notebook.py runs the walkthrough this way so that it cannot rot.
"""
import argparse
import base64
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures are rendered to PNG
import matplotlib.pyplot as plt  # noqa: E402


def _figure_outputs() -> list[dict]:
    """Every open figure as a Jupyter display_data output (PNG, base64), then closed."""
    outputs = []
    for number in plt.get_fignums():
        buf = io.BytesIO()
        plt.figure(number).savefig(buf, format="png", dpi=80, bbox_inches="tight")
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                                 "text/plain": ["<Figure>"]}})
    plt.close("all")
    return outputs


def run_notebook(path, save: bool = False, log=print) -> tuple[dict, dict]:
    """Execute the code cells of the notebook at path; returns the notebook (outputs filled)
    and the namespace the cells ran in (their variables, for tests)."""
    path = Path(path).resolve()
    notebook = json.loads(path.read_text())
    namespace = {"__name__": "__main__"}
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        count = 0
        for index, cell in enumerate(notebook["cells"]):
            if cell["cell_type"] != "code":
                continue
            count += 1
            source = "".join(cell["source"])
            out, t0 = io.StringIO(), time.time()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(source, f"{path.name}, cell {index}", "exec"), namespace)
            except Exception as e:
                raise RuntimeError(f"{path}: code cell {count} (cell {index}) failed: {e!r}\n"
                                   f"--- its output so far ---\n{out.getvalue()[-2000:]}") from e
            log(f"cell {count} ran in {time.time() - t0:.1f}s")
            outputs = [{"output_type": "stream", "name": "stdout", "text": out.getvalue().splitlines(True)}]
            cell["outputs"] = [o for o in outputs if o["text"]] + _figure_outputs()
            cell["execution_count"] = count
    finally:
        os.chdir(cwd)
    if save:
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return notebook, namespace


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebook")
    p.add_argument("--save", action="store_true", help="write the outputs back into the notebook")
    args = p.parse_args()
    run_notebook(args.notebook, args.save, log=lambda *a: print(*a, file=sys.stderr))
