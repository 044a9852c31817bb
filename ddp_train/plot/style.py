"""The look shared by every figure (run curves and sweep reports); imports matplotlib only, so
the sweep report does not pull in pandas through the run-log modules."""
from __future__ import annotations

import matplotlib

COLORS = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": "small",
         "axes.titlesize": "medium", "figure.titlesize": "medium"}
STEP_LABEL = "step (optimizer updates)"
