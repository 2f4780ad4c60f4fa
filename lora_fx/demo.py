"""`python -m lora_fx.demo`: the main job (kept at this path; the code is `lora_fx.cli.demo`)."""

from lora_fx.cli.demo import main, run_demo

__all__ = ["main", "run_demo"]

if __name__ == "__main__":
    raise SystemExit(main())
