"""SortedServe on Ray Serve: N engine replicas behind one ingress, with a budget-aware router.

- :mod:`app.ray_serve.picture`: the load picture a replica publishes in ``routing_stats``.
- :mod:`app.ray_serve.ranking`: which replica gives a request the deepest exit within its budget
  (pure Python, unit-tested like the scheduler).
- :mod:`app.ray_serve.router`: Ray Serve ``RequestRouter`` classes built on the ranking.
- :mod:`app.ray_serve.replica`: one engine replica, running the single-machine FastAPI app.
- :mod:`app.ray_serve.ingress`: the HTTP front: forwards requests; ``/ready``, ``/metrics``.
- :mod:`app.ray_serve.builder`: the Ray Serve application (also the KubeRay ``import_path``).
- :mod:`app.ray_serve.serve_cli`: ``python -m app serve-ray``.

Ray is an optional extra (``pip install -e '.[ray]'``); only the modules that need it import it.
"""
