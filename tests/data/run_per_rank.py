"""`ctt run ... --out OUT/rank<RANK>`: under torchrun, each process gets a directory of its own,
so a test sees which processes write. Usage: run_per_rank.py OUT [ctt run arguments]."""

import os
import sys

from continual_transformer.cli import app

out, arguments = sys.argv[1], sys.argv[2:]
app(["run", *arguments, "--out", os.path.join(out, f"rank{os.environ['RANK']}")], prog_name="ctt")
