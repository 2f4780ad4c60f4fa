"""`python -m lora_fx <command>`: the `lora-fx` command line."""

from lora_fx.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
