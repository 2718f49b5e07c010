"""``python -m kvcake.cli`` (what torchrun and accelerate launch run)."""

from kvcake.cli import main

main()
