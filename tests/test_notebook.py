"""The walkthrough notebook runs, cell by cell, and its numbers are the ones it claims.

Its code cells are executed in order by notebooks/run_notebook.py (no Jupyter needed), on the
demo world of the fast demo, so a change to minialign's API that breaks it fails here."""
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "text_to_text_dpo.ipynb"
sys.path.insert(0, str(REPO / "notebooks"))

from run_notebook import run_notebook  # noqa: E402


def test_saved_notebook_has_every_output():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 6
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))  # run in order, top to bottom
    assert all(c["outputs"] for c in code)
    assert any(o["output_type"] == "display_data" for c in code for o in c["outputs"])  # the training curves


@pytest.mark.slow
def test_notebook_runs_and_its_checks_hold(fast_demo_root, monkeypatch):
    monkeypatch.setenv("MINIALIGN_DEMO_ROOT", str(fast_demo_root))
    _, ns = run_notebook(NOTEBOOK, save=False, log=lambda *a: None)
    # Section 3: the reward is read at <|im_end|>; Bradley-Terry by hand equals minialign's loss, and
    # 60 steps rank held-out pairs better than a coin.
    assert ns["read_tokens"] == {"<|im_end|>"}
    assert float(ns["loss_bt_by_hand"].detach()) == pytest.approx(float(ns["lib_losses"].detach().mean()), abs=1e-5)
    assert ns["rm_accuracy"] > 0.5
    # Section 4: by hand equals minialign, the first loss is ln 2, and the first gradient is
    # -beta/2 (grad log pi_c - grad log pi_r), to float rounding of the largest entry.
    assert float((ns["pi_c"] - ns["lib_pi"].chunk(2)[0]).abs().max()) < 1e-4
    assert float(ns["loss_by_hand"]) == pytest.approx(math.log(2), abs=1e-6)
    assert ns["gradient_gap"] < 1e-5 * ns["largest"]
    # Section 5: both policies learned to rank the pairs (their DPO loss fell well below ln 2).
    for history in (ns["dpo_history"], ns["rpo_history"]):
        assert sum(history["loss"][-10:]) / 10 < 0.5
        assert history["rejected"][-1] < history["chosen"][-1]
    # Section 6: answers for every model and prompt.
    assert {len(texts) for texts in ns["answers"].values()} == {160}
