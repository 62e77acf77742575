"""The web app: Gradio UI and REST API over the same service functions (app.services)."""
