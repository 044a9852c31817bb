"""Training curves and a Markdown report from a run's logs (``ddp-plot``; docs/plotting.md).

Reads ``metrics.jsonl`` / ``eval.jsonl`` (or the human-readable ``train.log``) with numpy,
pandas and matplotlib only: nothing here imports torch, so it runs on laptops and login nodes.

* :mod:`.logs` parses the files (fast bulk path, later records win after a resume).
* :mod:`.stats` derives the numbers shared by the figures and the report.
* :mod:`.figures` draws the PNGs, :mod:`.report` writes ``report.md``, :mod:`.cli` is the CLI.
"""
