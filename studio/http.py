"""What the Space's web server refuses before Gradio sees a request."""

from __future__ import annotations

UPLOAD_ROUTES = ("/gradio_api/upload", "/gradio_api/upload_progress")
NO_UPLOADS = (
    b"This Space takes no file uploads: models are read from the Hub by their id, and results are made here."
)


class RefuseUploads:
    """ASGI middleware: the app has no upload field, so Gradio's upload routes answer 403 with words
    before a byte of the body is read (otherwise anyone could store files here for Gradio to serve)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/")
            if path in UPLOAD_ROUTES:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                    }
                )
                await send({"type": "http.response.body", "body": NO_UPLOADS})
                return
        await self.app(scope, receive, send)
