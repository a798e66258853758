import os
import sys

from .cli import main

code = main()
# Everything is written, closed and cleaned up by now (outputs are published or removed before main
# returns). Skipping the interpreter's teardown of torch's modules, in the commands that load torch
# (LoRA export, generation), saves ~0.4 s each.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
