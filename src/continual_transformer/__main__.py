"""`python -m continual_transformer` is `ctt` (what `torchrun -m continual_transformer` starts)."""

from .cli import app

app(prog_name="ctt")
