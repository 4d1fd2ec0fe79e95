"""The HTTP service: ``create_app(settings)`` in main.py, routes in routes/, the serve command in
serve_cli.py. It reaches the model only through ``app.engine``'s interface and never imports torch.
"""
