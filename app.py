"""Residuals Studio — the Gradio Space. The app is the `studio` package; this file serves it."""

import os

from studio.settings import Settings
from studio.ui import build, launch

studio = build(Settings.from_environment(os.environ))
demo = studio.demo  # what Gradio's tooling looks for

if __name__ == "__main__":
    launch(
        studio,
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
